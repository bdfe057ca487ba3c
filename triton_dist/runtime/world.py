"""A world: this process's place among the ranks, its device, process group and symmetric heap.

``triton_dist.init()`` turns a process started by ``triton-dist run`` (or ``torchrun``) into a rank of a
world; ``triton_dist.finalize()`` tears it down. Nothing happens at import time.

A **shared-GPU world** is one where several ranks of a node sit on one GPU (``triton-dist run --share-gpus``
sets ``TRITON_DIST_SHARE_GPUS=1``; rank ``r`` then takes GPU ``local_rank % G``). NCCL refuses two ranks on one GPU and
PyTorch's symmetric memory refuses overlapping devices, so there the host collectives run on gloo and the heaps are
shared by CUDA IPC (:class:`~triton_dist.runtime.heap.SharedGPUArena`). Kernels see the same device API; each rank
sizes its persistent grids by its share of the SMs (:attr:`World.num_sms`), so the programs of all ranks can be
resident at once. Timings there are not performance.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import mps
from .errors import CallMismatch, SignalTimeout
from .config import DEFAULT_HEAP_BYTES, SHARE_GPUS_ENV, Config
from .heap import RESERVED_BYTES, RESERVED_PAD_BYTES, CPUArena, CUDAArena, SharedGPUArena, SymmetricHeap, fmt_bytes

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_HOST_TIMEOUT = timedelta(seconds=120)
_current: "World | None" = None
TRAP_GRACE_S = 3.0  # how long a trapped kernel's synchronize may take before the record's error is raised anyway
_store = None  # the launcher's rendezvous store, kept for the life of the process
_generation = 0  # how many worlds this process has joined (every rank counts alike)
_world_store = None  # the PrefixStore of the world being made (None when the process group came from elsewhere)


def _init_process_group(backend: str, rank: int, world_size: int, **kwargs) -> None:
    """``init_process_group`` over a key prefix of its own for every world this process joins.

    ``finalize()`` then ``init()`` again: with a fresh env:// rendezvous each time, a fast rank could reach the old
    world's store (rank 0 not yet done tearing it down) or find its keys, and hang in the first barrier of the new
    world. So the rendezvous store (torch's own env:// one: rank 0 serves it, or torchrun's agent) is made once and
    each world uses ``PrefixStore("triton_dist/world<n>/")`` of it, ``n`` counting the worlds of this process."""
    global _store, _generation, _world_store
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=_HOST_TIMEOUT))
    _generation += 1
    store = _world_store = dist.PrefixStore(f"triton_dist/world{_generation}/", _store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_HOST_TIMEOUT, **kwargs)


@dataclass
class World:
    """What ``triton_dist.init()`` returns. ``backend`` is ``cpu``, ``cuda`` or ``nvshmem``; ``host_backend`` the
    process group's (``gloo`` in the CPU world and in a shared-GPU world, else ``cpu:gloo,cuda:nccl``);
    ``ranks_per_device`` how many ranks of this node share this rank's GPU (1 unless ``shared_gpu``); ``mps``
    whether this process is a client of an MPS daemon (ranks on a shared GPU then run concurrently)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    group: object = field(repr=False)
    backend: str
    config: Config = field(repr=False)
    host_backend: str = "gloo"
    shared_gpu: bool = False
    ranks_per_device: int = 1
    mps: bool = False
    heap: SymmetricHeap = field(repr=False, default=None)
    _device_barrier: object = field(repr=False, default=None)
    store: object = field(repr=False, default=None)  # the world's rendezvous store (named barriers)
    _named_barriers: int = field(repr=False, default=0)

    @property
    def interpreted(self) -> bool:
        """True in the CPU world, where kernels run under Triton's interpreter."""
        return self.backend == "cpu"

    @property
    def num_sms(self) -> int:
        """SMs this rank may fill with a persistent grid: the GPU's, or on a shared GPU this rank's share, so that the
        programs of every rank are resident at once (kernels whose programs wait for their peers' need that). Under
        MPS with a cap (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, set by the launcher) the device reports the capped
        count itself (seen on an H200: 66 / 42 / 32 SMs at 50 / 33 / 25 %); otherwise it is what the launcher's cap
        (``mps.share_percentage``) gives, in whole TPCs of 2 SMs. 1 in the CPU world."""
        if self.device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        if self.ranks_per_device == 1 or (self.mps and os.environ.get(mps.ACTIVE_THREADS_ENV)):
            return sms
        share = sms * mps.share_percentage(self.ranks_per_device) // 100
        return max(1, share - share % 2)

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work. If a kernel was stopped by the hang watchdog, raise
        :class:`SignalTimeout` naming the rank and signal instead of a bare CUDA error (:class:`CallMismatch` for a
        failed agreement check, or when a peer reported one)."""
        if self.device.type == "cuda":
            stuck = None
            try:
                if self.shared_gpu and not self.mps:  # time-sliced ranks: a trapped kernel's sync may never return
                    stuck = self._sync_watching_the_record()
                else:
                    torch.cuda.synchronize(self.device)
            except Exception as err:  # torch.AcceleratorError on newer torch
                from . import device_state
                device_state.check_after(err)
                if self.shared_gpu and self.mps:  # this rank's record is empty: the fault came from elsewhere
                    if self.store is not None:
                        why = self.timeout_error("its kernel was stopped by another MPS client's trap on this GPU",
                                                 self.config.wait_timeout_s, wait_s=2.0)
                        if isinstance(why, CallMismatch):  # that trap was a peer's mismatch check
                            raise why from err
                    err.add_note("triton_dist: in a shared-GPU world under MPS, a fault or watchdog trap of any rank "
                                 "on this GPU stops every rank's kernels, and this rank's watchdog record is empty: "
                                 "the cause is in another rank's message (the first 'triton_dist watchdog' line); "
                                 "if no rank printed one, a kernel faulted (e.g. an illegal address) on some rank.")
                raise
            if stuck is not None:
                raise stuck

    def _sync_watching_the_record(self) -> Exception | None:
        """``torch.cuda.synchronize`` in a helper thread while this one watches the watchdog record; returns None when
        the sync returned (its CUDA error re-raised here), or the record's error when a kernel trapped and the sync had
        not returned :data:`TRAP_GRACE_S` later. Used on time-sliced shared GPUs (no MPS), where two ranks' kernels
        trapping together left one rank's synchronize blocked for good (H200, 2026-12-01: the all_to_all_v
        disagreeing-splits test)."""
        from . import device_state
        done, failed = threading.Event(), []

        def sync():
            try:
                torch.cuda.synchronize(self.device)
            except BaseException as err:  # noqa: BLE001  (handed to the caller)
                failed.append(err)
            finally:
                done.set()

        threading.Thread(target=sync, daemon=True, name="triton_dist-sync").start()
        trapped_at = None
        while not done.wait(0.05):
            if device_state.recorded():
                trapped_at = trapped_at or time.monotonic()
                if time.monotonic() - trapped_at > TRAP_GRACE_S:
                    err = device_state.recorded_error()
                    err.add_note(f"triton_dist: the kernel trapped and torch.cuda.synchronize had not returned "
                                 f"{TRAP_GRACE_S:g} s later (seen on time-sliced shared GPUs): this process's CUDA "
                                 "context is unusable; end the process (finalize() cannot clean it up).")
                    return err
        if failed:
            raise failed[0]
        return None

    def barrier(self, what: str | None = None) -> None:
        """Host barrier: returns once every rank reached it and this rank's queued GPU work finished.

        ``what`` (e.g. ``"creating a context of all_reduce"``) makes it a *named* barrier, for the collective steps a
        rank takes only when its own call asks for it (making or growing an op's context): every rank must reach it
        with the same ``what``. A rank that waits ``TRITON_DIST_WAIT_TIMEOUT_S`` for the others, or meets another
        ``what``, raises :class:`~triton_dist.CallMismatch` naming the ranks that did not come (they made another
        call) instead of blocking in the process group. Through the world's store, a few round trips: for rare
        steps only."""
        self.synchronize()
        if what is None or self.store is None or self.world_size == 1:
            dist.barrier(group=self.group)
            return
        self._named_barriers += 1
        tag = f"named_barrier/{self._named_barriers}"
        self.store.set(f"{tag}/{self.rank}", what)
        keys = [f"{tag}/{r}" for r in range(self.world_size)]
        deadline = time.monotonic() + self.config.wait_timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                raise self._reported(CallMismatch(
                    f"rank {self.rank}: {what} (a collective step) waited {self.config.wait_timeout_s:g} s for ranks "
                    f"{missing}, which did not come: they made another call (a smaller size, another op or none). "
                    "Every rank must make the same sequence of op calls with the same shapes (TRITON_DIST_DEBUG=1 "
                    "checks each call on the host). This world is out of step now: finalize() and init() again."))
            time.sleep(0.0005)
        others = {r: self.store.get(k).decode() for r, k in enumerate(keys) if r != self.rank}
        differ = {r: v for r, v in others.items() if v != what}
        if differ:
            raise self._reported(CallMismatch(
                f"rank {self.rank}: {what}, but " + "; ".join(f"rank {r} was {v}" for r, v in differ.items())
                + ": the ranks made different calls. Every rank must make the same sequence of op calls with the "
                  "same shapes (TRITON_DIST_DEBUG=1 checks each call on the host)."))

    def report_mismatch(self, message: str) -> None:
        """Tell the peers that this rank stopped a call with :class:`~triton_dist.CallMismatch` (``message``), through
        the world's store: a peer whose wait in the same call then times out, or whose kernel another MPS client's
        trap stopped, raises ``CallMismatch`` quoting it (:meth:`timeout_error`) instead of a bare timeout. Error path
        only; best effort (the mismatch itself is raised either way)."""
        if self.store is None or self.world_size == 1:
            return
        try:
            self.store.set(f"mismatch/{self.rank}", json.dumps([time.time(), message]))
        except Exception:  # noqa: BLE001  (a store that is gone must not hide the error being raised)
            pass

    def _reported(self, err: CallMismatch) -> CallMismatch:
        self.report_mismatch(str(err))
        return err

    def peer_mismatches(self, since: float, wait_s: float = 0.0) -> list[tuple[int, str]]:
        """``(rank, message)`` of every peer that reported a mismatch (:meth:`report_mismatch`) at or after
        ``since`` (``time.time()``), polling up to ``wait_s`` seconds for the first one."""
        if self.store is None or self.world_size == 1:
            return []
        deadline = time.monotonic() + wait_s
        while True:
            found = []
            for r in range(self.world_size):
                key = f"mismatch/{r}"
                try:
                    if r == self.rank or not self.store.check([key]):
                        continue
                    stamp, message = json.loads(self.store.get(key))
                except Exception:  # noqa: BLE001  (no store: nothing to add to the error)
                    return []
                if stamp >= since:
                    found.append((r, message))
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def timeout_error(self, message: str, waited_s: float, wait_s: float = 0.0) -> Exception:
        """The error of a wait that timed out after ``waited_s`` seconds: :class:`~triton_dist.CallMismatch` if a peer
        reported a mismatch meanwhile (this rank waited for a call the peer stopped, e.g. the staged side of a call
        that the peer made with the LL protocol), naming it; else :class:`~triton_dist.SignalTimeout`."""
        found = self.peer_mismatches(time.time() - waited_s - 1.0, wait_s)
        if not found:
            return SignalTimeout(message)
        return CallMismatch(
            f"rank {self.rank}: the call was stopped because " + "; ".join(
                f"rank {r} found the ranks' calls differ: {m}" for r, m in found)
            + f" (this rank's own wait: {message})")

    def stream_barrier(self) -> None:
        """Device barrier on the current stream (no host sync on GPU); a host barrier in the CPU world."""
        if self.backend == "cpu":
            dist.barrier(group=self.group)
        elif self.shared_gpu:
            if self._device_barrier is None:
                raise RuntimeError("stream_barrier in a shared-GPU world needs triton_dist.init() (not "
                                   "triton_dist.runtime.world.init()), which installs its device barrier kernel")
            self._device_barrier(self)
        else:
            self.heap.arena.handle.barrier(channel=0)


def _env_int(name: str, default: int | None = None) -> int:
    val = os.environ.get(name)
    if val is None:
        if default is None:
            raise RuntimeError(f"{name} is not set")
        return default
    try:
        return int(val)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {val!r}") from None


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        if requested in ("cuda", "nvshmem") and not torch.cuda.is_available():
            raise RuntimeError(f"backend {requested!r} needs CUDA GPUs, but torch.cuda.is_available() is False; "
                               "use TRITON_DIST_BACKEND=cpu (the interpreter world)")
        if requested == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'cpu' runs kernels under Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before importing triton (`triton-dist run` does this without GPUs)")
        return requested
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return _pick_backend("cpu")
    return "cuda"


def _check_interpreter_numpy() -> None:
    import warnings

    import numpy
    import triton
    if triton.__version__ == "3.6.0" and tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        warnings.warn(f"numpy {numpy.__version__} with Triton 3.6.0's interpreter: kernel loops whose bounds are "
                      "runtime arguments fail ('only 0-dimensional arrays can be converted'); install numpy<2.4 "
                      "(triton-lang/triton#9171)", RuntimeWarning, stacklevel=3)


def init(backend: str = "auto", *, heap_size: int | None = None) -> World:
    """Join the world described by the torchrun environment and build the symmetric heap.

    Args:
        backend: ``"auto"`` (GPUs if present, else the CPU world), ``"cuda"``, ``"nvshmem"`` or ``"cpu"``;
            ``TRITON_DIST_BACKEND`` overrides ``"auto"``.
        heap_size: bytes of symmetric heap per rank (default: ``TRITON_DIST_HEAP_SIZE`` or 64 MiB on the
            CPU world, 2 GiB on GPUs).

    Returns the :class:`World`; calling ``init`` again returns the same world.
    """
    global _current, _world_store
    if _current is not None:
        return _current
    missing = [n for n in _REQUIRED_ENV if n not in os.environ]
    if missing:
        raise RuntimeError(
            f"triton_dist.init(): {', '.join(missing)} not set, so this process was not started by a launcher. "
            "Start it with `triton-dist run -n 4 script.py` (GPUs, or a CPU world of 4 ranks without GPUs) "
            "or `torchrun --nproc-per-node 4 script.py`.")
    cfg = Config.from_env(backend, heap_size)
    kind = _pick_backend(cfg.backend)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    nbytes = cfg.heap_bytes or DEFAULT_HEAP_BYTES[kind]
    if nbytes < 2 * RESERVED_BYTES:
        raise ValueError(f"symmetric heap of {fmt_bytes(nbytes)} per rank: the first {fmt_bytes(RESERVED_BYTES)} are "
                         f"reserved for the runtime's signals, so it must be at least {fmt_bytes(2 * RESERVED_BYTES)}; "
                         "raise TRITON_DIST_HEAP_SIZE (or heap_size=), e.g. 64M")

    if kind == "cpu":
        _check_interpreter_numpy()
        device = torch.device("cpu")
        host_backend, shared, ranks_per_device = "gloo", False, 1
        if not dist.is_initialized():
            _init_process_group("gloo", rank, world_size)
        group = dist.group.WORLD
        run_id = os.environ.get("TRITON_DIST_RUN_ID") or f"{os.environ['MASTER_PORT']}_{os.getppid()}"
        arena = CPUArena(nbytes, rank, world_size, run_id, lambda: dist.barrier(group=group))
    else:
        ngpu = torch.cuda.device_count()
        share = os.environ.get(SHARE_GPUS_ENV, "0") not in ("", "0")
        if local_rank >= ngpu and not share:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {ngpu} GPU(s) are visible; to run {local_world} ranks on {ngpu} "
                f"GPU(s) start them with `triton-dist run -n {local_world} --share-gpus` (or set {SHARE_GPUS_ENV}=1)")
        device = torch.device("cuda", local_rank % ngpu)
        torch.cuda.set_device(device)
        ranks_per_device = len(range(local_rank % ngpu, local_world, ngpu))
        shared = share and local_world > ngpu
        if shared and kind == "nvshmem":
            raise RuntimeError(
                f"backend 'nvshmem' cannot run {local_world} ranks on {ngpu} GPU(s): PyTorch's NVSHMEM backend needs "
                "one GPU per rank. Use TRITON_DIST_BACKEND=cuda, where libshmem_device calls run over CUDA IPC too.")
        if not dist.is_initialized():
            if shared:  # NCCL refuses two ranks on one GPU
                _init_process_group("gloo", rank, world_size)
            else:
                _init_process_group("cpu:gloo,cuda:nccl", rank, world_size, device_id=device)
        group = dist.group.WORLD
        host_backend = str(dist.get_backend(group))
        if shared:
            _check_heap_fits(nbytes, device, ranks_per_device, group)
            arena = SharedGPUArena(nbytes, device, group)
        else:
            ranks_per_device = 1
            arena = CUDAArena(nbytes, device, group, nvshmem=(kind == "nvshmem"))

    store, _world_store = _world_store, None  # this world's store, if this process made its group
    world = World(rank, world_size, local_rank, local_world, device, group, kind, cfg, host_backend=host_backend,
                  shared_gpu=shared, ranks_per_device=ranks_per_device, mps=shared and mps.client_env_active(),
                  store=store)
    world.heap = SymmetricHeap(arena, rank, world_size, group, debug=cfg.debug)
    _current = world
    if kind != "cpu":
        from . import device_state
        device_state.install(world)
    world.heap.local[:RESERVED_PAD_BYTES].zero_()
    world.barrier()
    if shared and local_rank == 0:
        print(f"triton-dist: shared-GPU world: {world_size} ranks on {min(ngpu, local_world)} GPU(s), up to "
              f"{ranks_per_device} per GPU; heaps over CUDA IPC, host collectives on gloo, MPS "
              f"{'on: ranks run concurrently' if world.mps else 'off: ranks time-slice'}; "
              f"each rank fills {world.num_sms} SMs. Timings here are not performance.", file=sys.stderr, flush=True)
    return world


def _check_heap_fits(nbytes: int, device: torch.device, ranks_per_device: int, group) -> None:
    """Every rank sharing ``device`` takes ``nbytes`` of it: fail on every rank, before anyone allocates, if that
    does not fit in the free memory (measured after every rank made its CUDA context)."""
    torch.cuda.init()
    dist.barrier(group=group)
    free, total = torch.cuda.mem_get_info(device)
    need = nbytes * ranks_per_device
    ok = torch.tensor([1 if need <= 0.9 * free else 0], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok):
        each = max(1, int(0.9 * free) // ranks_per_device >> 20)
        raise RuntimeError(
            f"shared-GPU world: {ranks_per_device} ranks on {device} need {ranks_per_device} x {fmt_bytes(nbytes)} = "
            f"{fmt_bytes(need)} of symmetric heap, but {device} has {fmt_bytes(free)} free (of {fmt_bytes(total)}) on "
            f"at least one rank. Shrink the heap, e.g. TRITON_DIST_HEAP_SIZE={each}M, or run fewer ranks per GPU.")


def finalize() -> None:
    """Leave the world: free the heap and destroy the process group (idempotent)."""
    global _current
    world, _current = _current, None
    if world is None:
        return
    try:
        world.barrier()
    finally:
        if world.backend != "cpu":
            from . import device_state
            device_state.uninstall()
        world.heap.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        # A World object someone still holds (a module global, a cache) must not keep its destroyed process group
        # alive until interpreter exit, where freeing it aborted the process ("terminate called without an active
        # exception"; seen when the autotuner held the world, 2026-12-01).
        world.group = None
        world.store = None


def current_world() -> World:
    """The world of this process; raises if ``triton_dist.init()`` has not run."""
    if _current is None:
        raise RuntimeError("triton_dist is not initialised in this process: call triton_dist.init() first "
                           "(inside a process started by `triton-dist run`)")
    return _current


def is_initialized() -> bool:
    return _current is not None
