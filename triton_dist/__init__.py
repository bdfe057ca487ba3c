"""triton-dist: compute-communication overlapping multi-GPU kernels in stock Triton.

Host API (device API: :mod:`triton_dist.language`)::

    import triton_dist
    world = triton_dist.init()                 # inside `triton-dist run -n 4 script.py`
    x = triton_dist.empty((1024,), torch.float32)   # on the symmetric heap, same offset on every rank
    y = triton_dist.peer_view(x, (world.rank + 1) % world.world_size)
    triton_dist.barrier()
    triton_dist.finalize()

Nothing happens at import time; ``init`` reads the torchrun environment.
"""
from __future__ import annotations

import sys

import torch

from .runtime.errors import CallMismatch, SignalTimeout
from .runtime.heap import AllocationMismatch, HeapExhausted, NotSymmetric
from .runtime.world import World, current_world, is_initialized
from .runtime import world as _world

__version__ = "0.1.0"
__all__ = ["init", "finalize", "empty", "zeros", "free", "peer_view", "barrier", "stream_barrier", "current_world",
           "is_initialized", "synchronize", "World", "HeapExhausted", "AllocationMismatch", "NotSymmetric",
           "SignalTimeout", "CallMismatch"]


def init(backend: str = "auto", *, heap_size: int | None = None) -> World:
    """Join the world of the current launcher and build the symmetric heap; see :func:`runtime.world.init`."""
    world = _world.init(backend, heap_size=heap_size)
    if world.interpreted:  # Triton's interpreter gets bf16 wrong: mend it before any kernel runs
        from .language import _interp_mend
        _interp_mend.install()
    else:
        from .language import _compile
        _compile.install(shmem="nvshmem" if world.backend == "nvshmem" else "triton_dist")
        if world.shared_gpu:
            from .kernels.stream_barrier import stream_barrier as device_barrier
            world._device_barrier = device_barrier
    return world


def finalize() -> None:
    """Leave the world (idempotent): the cached contexts of :mod:`triton_dist.ops` are released first (collective),
    so no op keeps buffers of a heap that is gone, and a later :func:`init` starts clean."""
    ops = sys.modules.get(f"{__name__}.ops")
    if ops is not None and is_initialized():
        ops.release_contexts()
    _world.finalize()


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uninitialised tensor on the symmetric heap. Collective: every rank allocates in the same order."""
    return current_world().heap.empty(shape, dtype)


def zeros(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeroed tensor on the symmetric heap (collective like :func:`empty`)."""
    t = empty(shape, dtype)
    t.zero_()
    return t


def free(t: torch.Tensor) -> None:
    """Give ``t``'s range back to the heap for reuse (every rank, same order as the allocations)."""
    current_world().heap.free(t)


def peer_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Host-side view of symmetric tensor ``t`` as it lives on ``rank`` (same shape and strides)."""
    return current_world().heap.peer_view(t, rank)


def synchronize() -> None:
    """Wait for this rank's GPU work; a kernel stopped by the hang watchdog raises :class:`SignalTimeout`."""
    current_world().synchronize()


def barrier() -> None:
    """Host barrier across the world (waits for this rank's GPU work first)."""
    current_world().barrier()


def stream_barrier() -> None:
    """Barrier on the current CUDA stream, no host sync (a host barrier in the CPU world)."""
    current_world().stream_barrier()
