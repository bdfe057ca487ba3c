"""A persistent world of rank processes that runs Python functions on every rank.

``ProcessWorld(n)`` starts ``n`` processes (CPU world: Triton's interpreter and shared-memory heaps; or one per
GPU with ``backend="cuda"``; with ``share_gpus=True`` rank ``r`` runs on GPU ``r % G``, a shared-GPU world, under a
private MPS daemon unless ``mps=False`` or one already serves this process), each of which calls
``triton_dist.init()`` once. ``world.run(fn, *args)`` runs
``fn(*args)`` on every rank and returns the list of results by rank. A rank that raises fails the call with that
rank's traceback (:class:`RankError`); ranks that do not finish within ``timeout`` seconds fail it with
:class:`WorldTimeout` naming them and showing where each was stuck (every thread's Python stack, dumped by
``faulthandler`` on SIGUSR1 just before the world is stopped). Either way the processes are killed and the next
``run`` starts a fresh world, so one broken test never poisons the next and nothing is left behind.

``fn`` must be importable by name (a module-level function), because it travels to the ranks by pickle.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
import traceback
import uuid
from multiprocessing.connection import wait as wait_conns

from ..runtime import mps as _mps
from ..runtime.config import SHARE_GPUS_ENV


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


class WorldTimeout(TimeoutError):
    """Some ranks did not finish in time; the message names them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack_file(run_id: str, rank: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"triton_dist_stacks_{run_id}_{rank}.txt")


def _worker(rank: int, world_size: int, env: dict, conn) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    stacks = open(_stack_file(env["TRITON_DIST_RUN_ID"], rank), "w")  # where a stuck rank's stacks go (SIGUSR1)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        import triton_dist
        triton_dist.init()
        conn.send(("ready", None))
    except BaseException:  # report start-up failures to the parent instead of dying silently
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
    triton_dist.finalize()


def _proc_state(pid: int) -> str:
    """Where the threads of ``pid`` are, from /proc (Linux): each thread's name, state and kernel wait channel, e.g.
    "threads: python3 S futex_wait_queue; cuda-EvtHandlr D uvm_..." (state D: blocked in the kernel, a driver call)."""
    rows = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as err:
        return f"no /proc entry ({err.strerror})"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat = f.read()
            name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            try:
                with open(f"{base}/wchan") as f:
                    wchan = f.read().strip() or "-"
            except OSError:
                wchan = "?"
            rows.append(f"{name} {state} {wchan}")
        except (OSError, ValueError, IndexError):
            continue
    return "threads (name, state, kernel wait channel): " + "; ".join(rows)


class ProcessWorld:
    """``n`` rank processes kept alive across calls; see the module docstring."""

    def __init__(self, world_size: int, backend: str = "cpu", env: dict | None = None, start_timeout: float = 120,
                 share_gpus: bool = False, mps: bool = True):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if share_gpus and backend == "cpu":
            raise ValueError("share_gpus=True places ranks on GPUs; the CPU world (backend='cpu') has none")
        self.world_size = world_size
        self.backend = backend
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.share_gpus = share_gpus
        self.mps = mps
        self._daemon = None  # the MPS daemon of a shared-GPU world: lives until close(), across restarts
        self._procs: list = []
        self._conns: list = []
        self._run_id = ""

    # ------------------------------------------------------------------ lifecycle
    def _env(self) -> dict:
        env = {"WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "TRITON_DIST_BACKEND": self.backend, "TRITON_DIST_RUN_ID": uuid.uuid4().hex[:12]}
        if self.backend == "cpu":
            env["TRITON_INTERPRET"] = "1"
        # One CPU thread per rank unless OMP_NUM_THREADS is set, as torchrun does: with torch's default (every core
        # in every rank) or even cores / ranks, the host work of the 4-rank GEMM GPU tests (random data, references)
        # ran ~10x slower than under torchrun (37 s vs 3-4 s per 50-call test, 4x H100, 2026-11-28).
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = "1"
        if self.share_gpus:
            env[SHARE_GPUS_ENV] = "1"
            env.update(self._daemon.env)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        if self._procs:
            return
        if self.share_gpus and self._daemon is None:
            import torch
            self._daemon = _mps.for_world(self.world_size, torch.cuda.device_count(), self.mps)
        ctx = mp.get_context("spawn")
        env = self._env()
        self._run_id = env["TRITON_DIST_RUN_ID"]
        for r in range(self.world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, self.world_size, env, child), daemon=True,
                            name=f"triton_dist-rank{r}")
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        self._collect(self.start_timeout, "start")

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None

    def _stacks(self, ranks) -> str:
        """Every thread's Python stack of each of ``ranks`` (still running): SIGUSR1 makes faulthandler write them."""
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
        out = []
        for r in ranks:
            try:
                with open(_stack_file(self._run_id, r)) as f:
                    text = f.read().strip()
            except OSError:
                text = ""
            if not text:  # e.g. blocked in the kernel (a driver call): what /proc says about its threads
                text = f"(no stack: the process did not answer; {_proc_state(self._procs[r].pid)})"
            out.append(f"--- rank {r} was stuck here:\n{text}")
        return "\n".join(out)

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        for c in self._conns:
            c.close()
        for r in range(len(self._procs)):
            try:
                os.unlink(_stack_file(self._run_id, r))
            except OSError:
                pass
        self._procs, self._conns = [], []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ running
    def run(self, fn, *args, timeout: float = 120, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results ordered by rank."""
        self.start()
        for c in self._conns:
            c.send((fn, args, kwargs))
        return self._collect(timeout, getattr(fn, "__name__", repr(fn)))

    def _collect(self, timeout: float, what: str) -> list:
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        pending = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if errors:  # the others may be blocked on the failed rank: give them a moment, then stop the world
                left = min(left, 3.0)
            ready = wait_conns(list(pending.values()), timeout=max(0.0, left))
            if not ready:
                break
            for c in ready:
                r = self._conns.index(c)
                try:
                    kind, payload = c.recv()
                except (EOFError, OSError):
                    kind, payload = "err", f"rank {r} died (exit code {self._procs[r].exitcode})"
                pending.pop(r)
                if kind == "err":
                    errors[r] = payload
                else:
                    results[r] = payload
        if errors or pending:
            stacks = self._stacks(sorted(pending)) if pending else ""
            self._kill()
            if errors:
                first = min(errors)
                others = f" (ranks {sorted(errors)} raised)" if len(errors) > 1 else ""
                stuck = f"; ranks {sorted(pending)} were still running and were stopped" if pending else ""
                raise RankError(f"{what}: rank {first} raised{others}{stuck}:\n{errors[first]}"
                                + (f"\n{stacks}" if stacks else ""))
            raise WorldTimeout(f"{what}: ranks {sorted(pending)} of {self.world_size} did not finish within "
                               f"{timeout:g} s; the world was stopped\n{stacks}")
        return [results[r] for r in range(self.world_size)]
