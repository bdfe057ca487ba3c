"""A world: this process's place among the ranks, its device, process group and symmetric heap.

``triton_dist.init()`` turns a process started by ``triton-dist run`` (or ``torchrun``) into a rank of a
world; ``triton_dist.finalize()`` tears it down. Nothing happens at import time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import DEFAULT_HEAP_BYTES, Config
from .heap import CPUArena, CUDAArena, SymmetricHeap

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_current: "World | None" = None


@dataclass
class World:
    """What ``triton_dist.init()`` returns. ``backend`` is ``cpu``, ``cuda`` or ``nvshmem``."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    group: object
    backend: str
    config: Config
    heap: SymmetricHeap = field(repr=False, default=None)

    @property
    def interpreted(self) -> bool:
        """True in the CPU world, where kernels run under Triton's interpreter."""
        return self.backend == "cpu"

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work. If a kernel was stopped by the hang watchdog, raise
        :class:`SignalTimeout` naming the rank and signal instead of a bare CUDA error."""
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception as err:  # torch.AcceleratorError on newer torch
                from . import device_state
                device_state.check_after(err)
                raise

    def barrier(self) -> None:
        """Host barrier: returns once every rank reached it and this rank's queued GPU work finished."""
        self.synchronize()
        dist.barrier(group=self.group)

    def stream_barrier(self) -> None:
        """Device barrier on the current stream (no host sync on GPU); a host barrier in the CPU world."""
        if self.backend == "cpu":
            dist.barrier(group=self.group)
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
    global _current
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

    if kind == "cpu":
        _check_interpreter_numpy()
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        group = dist.group.WORLD
        run_id = os.environ.get("TRITON_DIST_RUN_ID") or f"{os.environ['MASTER_PORT']}_{os.getppid()}"
        arena = CPUArena(nbytes, rank, world_size, run_id, lambda: dist.barrier(group=group))
    else:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world_size, device_id=device)
        group = dist.group.WORLD
        arena = CUDAArena(nbytes, device, group, nvshmem=(kind == "nvshmem"))

    world = World(rank, world_size, local_rank, local_world, device, group, kind, cfg)
    world.heap = SymmetricHeap(arena, rank, world_size, group, debug=cfg.debug)
    _current = world
    if kind != "cpu":
        from . import device_state
        device_state.install(world)
    world.heap.local[:RESERVED_PAD_BYTES].zero_()
    world.barrier()
    return world


RESERVED_PAD_BYTES = 4096  # runtime barrier slots at the start of the reserved region


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


def current_world() -> World:
    """The world of this process; raises if ``triton_dist.init()`` has not run."""
    if _current is None:
        raise RuntimeError("triton_dist is not initialised in this process: call triton_dist.init() first "
                           "(inside a process started by `triton-dist run`)")
    return _current


def is_initialized() -> bool:
    return _current is not None
