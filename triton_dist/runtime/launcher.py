"""The launcher behind ``triton-dist run``: start a world of ranks, watch it, and never leave a process behind.

Two modes share one supervisor:

* ``gpu``: one ``torchrun --standalone --nproc-per-node N`` child, which starts one rank per GPU; with
  ``share_gpus=True`` (``--share-gpus``) N may exceed the GPU count G and rank ``r`` runs on GPU ``r % G``
  (a shared-GPU world; a private MPS daemon is started for it unless ``mps=False`` or one already runs);
* ``cpu``: ``N`` Python children, one per emulated rank, each with the torchrun variables (``RANK``,
  ``WORLD_SIZE``, ...) plus ``TRITON_INTERPRET=1`` and ``TRITON_DIST_BACKEND=cpu``, so that
  ``triton_dist.init()`` joins the CPU world under Triton's interpreter.

Every child runs in its own session, so its whole process group can be signalled. When a child fails
the others are stopped (SIGTERM, then SIGKILL after ``grace`` seconds) and its exit code is returned;
when the world overruns its deadline everything is stopped and 124 is returned (like ``timeout(1)``).

========================================  ===========================================================
variable                                  meaning
========================================  ===========================================================
``TRITON_DIST_LAUNCH_MODE``               ``gpu`` or ``cpu``: what ``mode="auto"`` picks
``TRITON_DIST_RUN_TIMEOUT``               seconds the whole world may run (default 1800)
``TRITON_DIST_STRAGGLER_TIMEOUT``         seconds the last ranks may run after the first one finished
                                          successfully (default 300)
========================================  ===========================================================
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from . import mps as _mps
from ._trampoline import ENV as TARGET_ENV
from .config import MULTICAST_OFF_ENV, SHARE_GPUS_ENV

MODES = ("auto", "gpu", "cpu")
DEFAULT_RUN_TIMEOUT_S = 1800.0
DEFAULT_STRAGGLER_TIMEOUT_S = 300.0
DEFAULT_CPU_NPROCS = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
_POLL_S = 0.02


# ---------------------------------------------------------------------------- choosing the world
def _cuda_device_count() -> int:
    import torch  # only here: a CPU launch with an explicit rank count never imports torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_mode(mode: str = "auto") -> str:
    """Return ``"gpu"`` or ``"cpu"`` for ``mode`` (``auto``: ``TRITON_DIST_LAUNCH_MODE``, else GPUs if any)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get("TRITON_DIST_LAUNCH_MODE", "").strip().lower()
        if env and env != "auto":
            if env not in ("gpu", "cpu"):
                raise ValueError(f"TRITON_DIST_LAUNCH_MODE must be 'auto', 'gpu' or 'cpu', got {env!r}")
            return env
        return "gpu" if _cuda_device_count() >= 1 else "cpu"
    return mode


def resolve_nprocs(nprocs: int | str, mode: str, share_gpus: bool = False) -> int:
    """Number of ranks for ``nprocs`` (an int, or ``"auto"``: local GPUs in GPU mode, else 4) in ``mode``; more
    ranks than GPUs only with ``share_gpus``."""
    if nprocs == "auto":
        n = _cuda_device_count() if mode == "gpu" else DEFAULT_CPU_NPROCS
        if n < 1:
            raise ValueError("nprocs='auto' in GPU mode, but no CUDA GPU is visible; pass --mode cpu for the "
                             "CPU world")
        return n
    try:
        n = int(nprocs)
    except (TypeError, ValueError):
        raise ValueError(f"nprocs must be a positive integer or 'auto', got {nprocs!r}") from None
    if n < 1 or str(n) != str(nprocs).strip():
        raise ValueError(f"nprocs must be a positive integer or 'auto', got {nprocs!r}")
    if mode == "gpu":
        gpus = _cuda_device_count()
        if gpus == 0:
            raise ValueError(f"GPU mode, but no CUDA GPU is visible; use --mode cpu for a CPU world of {n} ranks")
        if n > gpus and not share_gpus:
            raise ValueError(f"asked for {n} ranks in GPU mode, but only {gpus} CUDA GPU(s) are visible; "
                             f"use -n {gpus} or fewer, --share-gpus to put several ranks on one GPU, or --mode cpu "
                             f"for a CPU world of {n} ranks")
    return n


def check_share_gpus(mode: str) -> None:
    """``--share-gpus`` places ranks on GPUs: refuse it, saying what to do, where there are none."""
    if _cuda_device_count() < 1:
        raise ValueError("--share-gpus puts several ranks on each GPU, but no CUDA GPU is visible; drop it and use "
                         "--mode cpu for a CPU world of emulated ranks")
    if mode == "cpu":
        raise ValueError("--share-gpus places ranks on GPUs, but --mode cpu (or TRITON_DIST_LAUNCH_MODE=cpu) asks for "
                         "a CPU world; drop one of the two")


def _seconds(value, name: str, env_name: str, default: float) -> float:
    if value is None:
        value, name = os.environ.get(env_name) or default, env_name
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}") from None
    if not s > 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    return s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_command(nprocs: int) -> list[str]:
    """The ``torchrun`` command line of a GPU launch. Each rank runs the trampoline, which runs the target with
    its arguments from ``TRITON_DIST_TARGET`` (see :func:`gpu_env`), so torchrun never parses them."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
            "-m", "triton_dist.runtime._trampoline"]


def cpu_command(target: str, args, *, module: bool = False) -> list[str]:
    """The command line of one rank of a CPU launch."""
    return [sys.executable, *(["-m"] if module else []), target, *args]


def _with_package_path(env: dict) -> dict:
    """Ranks import triton_dist from where this launcher did, installed or not."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def gpu_env(base: dict, target: str = "", args=(), *, module: bool = False, share_gpus: bool = False,
            mps_env: dict | None = None) -> dict:
    """Environment of the ``torchrun`` child: multicast forced off, ``OMP_NUM_THREADS=1`` unless set, the target for
    the trampoline, and for a shared-GPU world ``TRITON_DIST_SHARE_GPUS=1`` plus the MPS daemon's pipe directories
    (``mps_env``; ``{}`` when MPS is off)."""
    env = _with_package_path(dict(base))
    env.update(MULTICAST_OFF_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    env[TARGET_ENV] = json.dumps({"target": target, "args": list(args), "module": module})
    if share_gpus:
        env[SHARE_GPUS_ENV] = "1"
        env.update(mps_env or {})
    return env


def cpu_rank_env(base: dict, rank: int, world_size: int, port: int, run_id: str) -> dict:
    """Environment of ``rank`` in a CPU world: the torchrun variables plus the interpreter switches."""
    env = _with_package_path(dict(base))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TRITON_INTERPRET="1", TRITON_DIST_BACKEND="cpu", TRITON_DIST_RUN_ID=run_id)
    env.update(MULTICAST_OFF_ENV)
    return env


# ---------------------------------------------------------------------------- process groups
@dataclass
class _Child:
    name: str  # "rank 3", or "torchrun"
    ranks: list[int]  # ranks this child stands for
    proc: subprocess.Popen


def _proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, process group, state, start time) of every process (Linux ``/proc``; empty elsewhere)."""
    table = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            table[int(path.split("/")[2])] = (int(fields[1]), int(fields[2]), fields[0], fields[19])
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(roots: list[int], table: dict) -> set[tuple[int, str]]:
    """(pid, start time) of every descendant of ``roots``; the start time tells a reused pid apart."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for kid in children.get(todo.pop(), ()):
            if (kid, table[kid][3]) not in found:
                found.add((kid, table[kid][3]))
                todo.append(kid)
    return found


def _living(pgids: list[int], strays: set[tuple[int, str]], table: dict) -> set[tuple[int, str]]:
    """Processes still running (zombies excluded) in the groups ``pgids`` or among ``strays``."""
    if not table:  # no /proc: ask the kernel whether the groups still exist (zombies count)
        return {(pg, "") for pg in pgids if _signal_group(pg, 0)}
    return {(pid, start) for pid, (_, pgrp, state, start) in table.items()
            if state != "Z" and (pgrp in pgids or (pid, start) in strays)}


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):  # gone, or the id now belongs to someone else
        return False


def _signal_strays(strays: set[tuple[int, str]], sig: int, table: dict) -> None:
    for pid, start in strays:
        if pid in table and table[pid][3] == start:  # still the same process, not a reused pid
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _stop(children: list[_Child], grace: float) -> None:
    """SIGTERM every child's process group, wait up to ``grace`` s, then SIGKILL what is left.

    Descendants that left their child's group (torchrun puts each worker in a session of its own) are
    found through ``/proc`` and signalled too, so nothing outlives the launcher.
    """
    pgids = [c.proc.pid for c in children]
    table = _proc_table()
    strays = _descendants(pgids, table)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    _signal_strays(strays, signal.SIGTERM, table)
    deadline = time.monotonic() + grace
    while True:
        for c in children:
            c.proc.poll()  # reap the leaders: a zombie leader keeps its group alive
        table = _proc_table()
        strays |= _descendants(pgids, table)
        if not _living(pgids, strays, table) or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    _signal_strays(strays, signal.SIGKILL, table)
    for c in children:
        try:
            c.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more we can do
            pass


def _say(msg: str) -> None:
    print(f"triton-dist: {msg}", file=sys.stderr, flush=True)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"{returncode} (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            return str(returncode)
    return str(returncode)


def _running_ranks(children: list[_Child]) -> list[int]:
    return sorted(r for c in children if c.proc.returncode is None for r in c.ranks)


def _supervise(children: list[_Child], timeout: float, straggler_timeout: float, grace: float) -> int:
    start = time.monotonic()
    first_done: float | None = None
    while True:
        for c in children:
            c.proc.poll()
        failed = [c for c in children if c.proc.returncode not in (None, 0)]
        if failed:
            bad = failed[0]
            _say(f"{bad.name} exited with code {_describe(bad.proc.returncode)}; "
                 f"stopping ranks still running: {_running_ranks(children)}")
            _stop(children, grace)
            return _exit_code(bad.proc.returncode)
        running = _running_ranks(children)
        if not running:
            return 0
        now = time.monotonic()
        if first_done is None and len(running) < sum(len(c.ranks) for c in children):
            first_done = now
            finished = sorted(r for c in children if c.proc.returncode == 0 for r in c.ranks)
        if now - start > timeout:
            _say(f"the world made no progress within {timeout:g} s; ranks still running: {running}; stopping them")
            _stop(children, grace)
            return EXIT_TIMEOUT
        if first_done is not None and now - first_done > straggler_timeout:
            _say(f"the world made no progress within {straggler_timeout:g} s; ranks still running: {running}; "
                 f"stopping them (the other ranks finished {now - first_done:.0f} s ago; ranks {finished} exited 0 "
                 "first: a rank that leaves before a collective its peers wait in keeps them waiting)")
            _stop(children, grace)
            return EXIT_TIMEOUT
        time.sleep(_POLL_S)


class _Terminated(KeyboardInterrupt):
    """SIGTERM reached the launcher (a KeyboardInterrupt, so a caller that stops on Ctrl-C stops on it too)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _stop_uninterrupted(children: list[_Child], grace: float, in_main: bool) -> None:
    """:func:`_stop` with SIGINT and SIGTERM ignored meanwhile, so a second Ctrl-C cannot leave orphans."""
    if not in_main:
        _stop(children, grace)
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _stop(children, grace)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _start(children: list[_Child], mode: str, n: int, target: str, args: list, module: bool, run_id: str,
           share_gpus: bool = False, mps_env: dict | None = None) -> None:
    """Start the world's children, appending each to ``children`` as soon as it runs."""
    if mode == "gpu":
        env = gpu_env(os.environ, target, args, module=module, share_gpus=share_gpus, mps_env=mps_env)
        proc = subprocess.Popen(gpu_command(n), env=env, start_new_session=True)
        children.append(_Child("torchrun", list(range(n)), proc))
        return
    port = free_port()
    for r in range(n):
        env = cpu_rank_env(os.environ, r, n, port, run_id)
        proc = subprocess.Popen(cpu_command(target, args, module=module), env=env, start_new_session=True)
        children.append(_Child(f"rank {r}", [r], proc))


# ---------------------------------------------------------------------------- entry point
def launch(nprocs: int | str, target: str, args=(), *, module: bool = False, mode: str = "auto",
           timeout: float | None = None, grace: float = 10.0, straggler_timeout: float | None = None,
           share_gpus: bool = False, mps: bool = True) -> int:
    """Run ``target`` (a script path, or a module name with ``module=True``) on ``nprocs`` ranks.

    Args:
        nprocs: number of ranks, or ``"auto"`` (the local GPUs in GPU mode, 4 in the CPU world).
        target: script path, or module name when ``module`` is true; ``args`` are passed through untouched.
        mode: ``"gpu"`` (torchrun, one rank per GPU), ``"cpu"`` (interpreter world) or ``"auto"``
            (``TRITON_DIST_LAUNCH_MODE``, else GPU mode when CUDA GPUs are visible).
        timeout: seconds the whole world may run (default ``TRITON_DIST_RUN_TIMEOUT`` or 1800).
        grace: seconds between SIGTERM and SIGKILL when ranks are stopped.
        straggler_timeout: seconds the remaining ranks may run once one rank exited 0 (default
            ``TRITON_DIST_STRAGGLER_TIMEOUT`` or 300).
        share_gpus: GPU mode only: allow more ranks than GPUs, rank ``r`` on GPU ``r % G`` (a shared-GPU world).
        mps: with ``share_gpus``, start a private MPS daemon for the world (when ``nvidia-cuda-mps-control``
            exists and no daemon serves this process already), stopped when the world ends; ``False``: the ranks
            time-slice the GPU.

    Returns the exit code for the launcher: 0 when every rank exited 0, the first failing rank's code
    (128 + signal number for a rank killed by a signal), or 124 when a deadline passed. On
    KeyboardInterrupt every rank is stopped and the interrupt re-raised; SIGTERM to the launcher stops
    every rank and returns 130 (a signal the caller ignores, as a background shell job ignores SIGINT,
    stays ignored). Raises ``ValueError`` for bad arguments (before starting anything).
    """
    mode = resolve_mode(mode)
    if share_gpus:
        check_share_gpus(mode)
    n = resolve_nprocs(nprocs, mode, share_gpus)
    if not target:
        raise ValueError("launch: target must name a script or (with module=True) a module")
    if not module and not os.path.isfile(target):
        raise ValueError(f"no such file: {target!r} (to run a module, pass -m and its name)")
    timeout = _seconds(timeout, "timeout", "TRITON_DIST_RUN_TIMEOUT", DEFAULT_RUN_TIMEOUT_S)
    straggler_timeout = _seconds(straggler_timeout, "straggler_timeout", "TRITON_DIST_STRAGGLER_TIMEOUT",
                                 DEFAULT_STRAGGLER_TIMEOUT_S)
    if not isinstance(grace, (int, float)) or not grace >= 0:
        raise ValueError(f"launch: grace must be a number of seconds >= 0, got {grace!r}")
    args = list(args)

    in_main = threading.current_thread() is threading.main_thread()
    children: list[_Child] = []
    run_id = uuid.uuid4().hex[:12]
    gpus = _cuda_device_count() if share_gpus else 0
    daemon = _mps.for_world(n, gpus, mps) if share_gpus else _mps.NoMPS()
    pending: list[int] = []  # signals that arrived while ranks were starting
    saved = {}
    if in_main:  # hold SIGINT/SIGTERM until every started child is on the list, so none can be missed
        saved = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                 for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        _start(children, mode, n, target, args, module, run_id, share_gpus, daemon.env)
        if saved:
            if signal.SIGINT in saved:
                signal.signal(signal.SIGINT, saved[signal.SIGINT])
            if signal.SIGTERM in saved:
                signal.signal(signal.SIGTERM, _on_sigterm)
            if pending:
                raise KeyboardInterrupt if pending[0] == signal.SIGINT else _Terminated()
        return _supervise(children, timeout, straggler_timeout, grace)
    except _Terminated:
        _say(f"terminated; stopping ranks still running: {_running_ranks(children)}")
        _stop_uninterrupted(children, grace, in_main)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say(f"interrupted; stopping ranks still running: {_running_ranks(children)}")
        _stop_uninterrupted(children, grace, in_main)
        raise
    finally:
        if children:  # normally a no-op; catches anything a rank left behind in its process group
            _stop_uninterrupted(children, 0.0 if all(c.proc.returncode is not None for c in children) else grace,
                                in_main)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        daemon.stop()
        if mode == "cpu":  # a rank killed before it unlinked its heap file would leak it
            for path in glob.glob(f"/dev/shm/triton_dist_{run_id}_*"):
                try:
                    os.unlink(path)
                except OSError:
                    pass
