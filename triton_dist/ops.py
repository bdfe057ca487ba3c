"""Collectives on torch tensors: ``from triton_dist import ops``.

Each op takes and returns torch tensors and keeps one context per (op, dtype) that owns its symmetric buffers; the
first call with a larger size replaces the context (collective: every rank calls the ops in the same order with the
same shapes, as with torch.distributed). After that first call an op allocates nothing on the symmetric heap and
never syncs with the host, so it can be captured in a CUDA graph. ``method="auto"`` picks by size and world;
a method name forces one.

=========================  ============================  ===============================================
op                         shards                        methods
=========================  ============================  ===============================================
``all_reduce(x)``          x: any shape -> same shape     ``ll``, ``one_shot``, ``push_one_shot`` (latency),
                                                          ``two_shot``, ``push_two_shot`` (bandwidth)
``all_gather(x)``          (m, ...) -> (world*m, ...)     ``ll``, ``pull``, ``push``, ``ring``, ``copy_engine``
``reduce_scatter(x)``      (world*m, ...) -> (m, ...)     ``full_mesh``, ``push``, ``ring`` (fp32 partials)
``all_to_all(x)``          (world*m, ...) -> same         equal splits
``all_to_all_v(x, i, o)``  rows split by i -> rows by o   variable splits
=========================  ============================  ===============================================
"""
from __future__ import annotations

import torch

from .kernels import all_gather as _ag
from .kernels import all_reduce as _ar
from .kernels import all_to_all as _a2a
from .kernels import reduce_scatter as _rs
from .runtime.world import current_world

_contexts: dict = {}


def _context(op: str, cls, numel: int, dtype: torch.dtype):
    key = (op, dtype)
    ctx = _contexts.get(key)
    if ctx is None or ctx.max_numel < numel:
        if ctx is not None:
            ctx.close()
        capacity = 1 << max(12, (max(numel, 1) - 1).bit_length())  # powers of two: few re-allocations
        ctx = _contexts[key] = cls(capacity, dtype)
    return ctx


def release_contexts() -> None:
    """Free every cached context's symmetric buffers (collective, like the ops)."""
    for ctx in _contexts.values():
        ctx.close()
    _contexts.clear()
    _a2a.close_default_context()


def all_reduce(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over all ranks (fp32 accumulation for bf16/fp16); see :mod:`triton_dist.kernels.all_reduce`."""
    slots = current_world().world_size if method == "push_one_shot" else 1  # one staging slot per rank
    ctx = _context("all_reduce", _ar.AllReduceContext, slots * x.numel(), x.dtype)
    return _ar.all_reduce(x, ctx=ctx, method=method, out=out)


def all_gather(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank's ``x`` stacked along dim 0 in rank order; see :mod:`triton_dist.kernels.all_gather`."""
    ctx = _context("all_gather", _ag.AllGatherContext, x.numel(), x.dtype)
    return _ag.all_gather(x, ctx=ctx, method=method, out=out)


def reduce_scatter(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ``rank`` (along dim 0) of the sum of ``x`` over ranks; see :mod:`triton_dist.kernels.reduce_scatter`."""
    ctx = _context("reduce_scatter", _rs.ReduceScatterContext, x.numel(), x.dtype)
    return _rs.reduce_scatter(x, ctx=ctx, method=method, out=out)


def all_to_all(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 (``all_to_all_single`` semantics); see
    :mod:`triton_dist.kernels.all_to_all`."""
    return _a2a.all_to_all(x, out=out)


def all_to_all_v(x: torch.Tensor, input_split_sizes, output_split_sizes, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Variable-split all-to-all along dim 0 (``all_to_all_single`` with split sizes)."""
    return _a2a.all_to_all_v(x, input_split_sizes, output_split_sizes, out=out)
