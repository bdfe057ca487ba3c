"""A private NVIDIA MPS daemon for a shared-GPU world, so that ranks on one GPU run concurrently.

Without MPS, processes on one GPU time-slice (each context gets the whole GPU for a slice; a rank spinning on a
signal holds its slice until preempted): correct, slow. With MPS their kernels run side by side. We never change
GPU settings (compute mode, clocks): a control daemon started by an ordinary process with its own pipe and log
directories serves only the processes that point ``CUDA_MPS_PIPE_DIRECTORY`` at it.

::

    with PrivateMPS.start_if_possible() as mps_env:   # {} when not possible or one already runs
        env.update(mps_env)                            # the ranks connect at their first CUDA call

``triton-dist mps start`` prints ``export`` lines for a shell (the GPU suite evals them) and
``triton-dist mps stop DIR`` stops the daemon started that way.

A fault in one MPS client (a trap of the hang watchdog included) is delivered to every client of the daemon on that
GPU: in a world under MPS, one rank's failure fails the others too.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
# Each client's cap on the SMs it may use. Kernels of one rank whose programs wait for another rank's (a consumer
# grid larger than the GPU, spinning on a producer grid launched later by a peer) deadlock under MPS if one rank's
# grid can take every SM; a cap of at most 100 / (ranks per GPU) percent leaves every rank its share
# (:func:`share_percentage` picks one under which cuBLAS is right).
ACTIVE_THREADS_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # what clients and daemons use when PIPE_ENV is unset


def control_binary() -> str | None:
    """Path of ``nvidia-cuda-mps-control``, or None when it is not installed."""
    return shutil.which(CONTROL)


def _daemon_at(pipe_dir: str) -> bool:
    return os.path.exists(os.path.join(pipe_dir, "control"))


def running_pipe_dir(env=None) -> str | None:
    """The pipe directory of an MPS daemon this process's children would connect to, or None."""
    env = os.environ if env is None else env
    pipe_dir = env.get(PIPE_ENV) or DEFAULT_PIPE_DIR
    return pipe_dir if _daemon_at(pipe_dir) else None


def client_env_active(env=None) -> bool:
    """True when a process started with ``env`` (default: this one) is an MPS client: a daemon answers there."""
    return running_pipe_dir(env) is not None


def _daemon_pids(pipe_dir: str) -> list[int]:
    """MPS control daemons and servers whose environment names ``pipe_dir`` (Linux ``/proc``)."""
    pids = []
    want = f"{PIPE_ENV}={pipe_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if not f.read().startswith("nvidia-cuda-mps"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


class PrivateMPS:
    """An MPS control daemon with its own pipe and log directories under a fresh temporary directory."""

    def __init__(self, root: str):
        self.root = root
        self.pipe_dir = os.path.join(root, "pipe")
        self.log_dir = os.path.join(root, "log")

        self.env = {PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir}  # what a rank needs to be a client of it

    @classmethod
    def start(cls, timeout: float = 10.0) -> "PrivateMPS":
        """Start a daemon (``nvidia-cuda-mps-control -d``) and wait until its control pipe exists."""
        binary = control_binary()
        if binary is None:
            raise RuntimeError(f"{CONTROL} is not installed: ranks on a shared GPU will time-slice (use --no-mps)")
        self = cls(tempfile.mkdtemp(prefix="triton_dist_mps_"))
        os.makedirs(self.pipe_dir)
        os.makedirs(self.log_dir)
        env = dict(os.environ, **self.env)
        out = subprocess.run([binary, "-d"], env=env, capture_output=True, text=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while out.returncode == 0 and not _daemon_at(self.pipe_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if out.returncode != 0 or not _daemon_at(self.pipe_dir):
            self.stop()
            raise RuntimeError(f"{CONTROL} -d did not start (exit {out.returncode}): {out.stderr.strip()}"
                               f"{self._log_tail()}")
        return self

    @classmethod
    def start_if_possible(cls) -> "PrivateMPS | NoMPS":
        """A started daemon; or, when the control binary is missing or a daemon already serves this process's
        children (``CUDA_MPS_PIPE_DIRECTORY``, else the system default), a stand-in whose ``env`` is empty."""
        if control_binary() is None or client_env_active():
            return NoMPS()
        return cls.start()

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.log_dir, "control.log")) as f:
                return "; control.log: " + " | ".join(f.read().strip().splitlines()[-5:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the daemon to quit (it stops its server once the clients are gone), kill it after ``timeout`` s,
        and remove the directories. Idempotent."""
        if not os.path.isdir(self.root):
            return
        binary = control_binary()
        if binary and _daemon_at(self.pipe_dir):
            try:
                subprocess.run([binary], input="quit\n", env=dict(os.environ, **self.env), capture_output=True,
                               text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while _daemon_pids(self.pipe_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _daemon_pids(self.pipe_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> dict:
        return self.env

    def __exit__(self, *exc) -> None:
        self.stop()


class NoMPS:
    """Stands in for :class:`PrivateMPS` when none is started: nothing to stop; ``env`` is what the ranks get
    (empty, or :data:`OPT_OUT_ENV` to keep them off any daemon)."""

    def __init__(self, env: dict | None = None):
        self.env = dict(env or {})

    def stop(self, timeout: float = 10.0) -> None:
        pass

    def __enter__(self) -> dict:
        return self.env

    def __exit__(self, *exc) -> None:
        pass


# A client whose pipe directory holds no daemon runs without MPS: what ``--no-mps`` gives the ranks, so that a
# daemon already running on the machine does not pick them up either.
OPT_OUT_ENV = {PIPE_ENV: "/nonexistent/triton_dist_no_mps"}


# The caps under which torch.matmul (cuBLAS) gave right answers on an H200 (driver 580.159, torch 2.11 + cu130,
# ``scripts/probe_matmul_mps.py``, 2026-12-01): 960 bf16 products each, none wrong uncapped or at 50 % or 25 %, but
# 48 to 905 wrong (errors of ~100 where rounding explains < 1, sometimes NaN) at 20, 28, 30-36, 40 and 45 %. A 3-rank
# world at 33 % made the tests' torch references wrong, not our kernels.
CUBLAS_SAFE_PERCENTAGES = (50, 25)


def share_percentage(ranks_per_gpu: int) -> int:
    """The ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` of each of ``ranks_per_gpu`` ranks on one GPU: the largest of
    :data:`CUBLAS_SAFE_PERCENTAGES` that leaves every rank its share (at most ``100 // ranks_per_gpu``), so 50 for 2
    ranks and 25 for 3 or 4 (3 ranks then leave a quarter of the SMs idle: correct beats busy). With more than 4 ranks
    per GPU no safe cap is known: ``100 // ranks_per_gpu`` (:func:`for_shared_world` warns)."""
    n = max(1, ranks_per_gpu)
    if n == 1:
        return 100
    fair = max(1, 100 // n)
    return max([p for p in CUBLAS_SAFE_PERCENTAGES if p <= fair], default=fair)


def for_world(nranks: int, gpus: int, use_mps: bool = True) -> "PrivateMPS | NoMPS":
    """What a launcher of ``nranks`` ranks on ``gpus`` GPUs starts: nothing when every rank has its own GPU, else
    :func:`for_shared_world` for ``ceil(nranks / gpus)`` ranks per GPU."""
    if nranks <= gpus:
        return NoMPS()
    return for_shared_world(use_mps, -(-nranks // max(gpus, 1)))


def for_shared_world(use_mps: bool = True, ranks_per_gpu: int = 1) -> "PrivateMPS | NoMPS":
    """What a launcher of a shared-GPU world starts: a private daemon if ``use_mps`` and possible (see
    :meth:`PrivateMPS.start_if_possible`; a daemon that fails to start is reported and the ranks time-slice), else
    the opt-out environment. When a daemon serves the ranks (ours or one already running), ``env`` also caps each
    rank at its share of the SMs (:data:`ACTIVE_THREADS_ENV`, unless this process's environment sets it)."""
    if not use_mps:
        return NoMPS(OPT_OUT_ENV)
    try:
        daemon = PrivateMPS.start_if_possible()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        print(f"triton-dist: {err}; the ranks time-slice the GPU instead", file=sys.stderr, flush=True)
        return NoMPS()
    if client_env_active(dict(os.environ, **daemon.env)) and ACTIVE_THREADS_ENV not in os.environ:
        pct = share_percentage(ranks_per_gpu)
        daemon.env[ACTIVE_THREADS_ENV] = str(pct)
        if pct not in CUBLAS_SAFE_PERCENTAGES and pct != 100:
            print(f"triton-dist: warning: {ranks_per_gpu} ranks per GPU run as MPS clients capped at {pct} % of the "
                  "SMs, where torch.matmul (cuBLAS) may return wrong results (seen on an H200 at most caps other than "
                  f"{' and '.join(map(str, CUBLAS_SAFE_PERCENTAGES))} %): check with "
                  f"`python3 scripts/probe_matmul_mps.py {pct}`, or use at most 4 ranks per GPU", file=sys.stderr,
                  flush=True)
    return daemon


def main(argv: list[str]) -> int:
    """``start``: start a daemon, print shell ``export`` lines; ``stop DIR``: stop the daemon rooted at DIR."""
    if argv[:1] == ["start"] and len(argv) == 1:
        mps = PrivateMPS.start()
        print(f"export {PIPE_ENV}={mps.pipe_dir} {LOG_ENV}={mps.log_dir} TRITON_DIST_MPS_ROOT={mps.root}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        PrivateMPS(argv[1]).stop()
        return 0
    print("usage: triton-dist mps start | stop DIR", file=sys.stderr)
    return 2
