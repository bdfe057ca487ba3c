"""ReduceScatter (sum), full mesh, fp32 accumulation.

Shards: every rank holds ``x`` of shape ``(world * m, ...)``; rank ``r`` gets ``sum_q x_q[r*m:(r+1)*m]`` of shape
``(m, ...)`` (the semantics of ``torch.distributed.reduce_scatter_tensor``).

Protocol (``_common.py``; regions 0 ``ready``, 2 ``done``): wait ``done >= e-1``; stage ``x`` (fixed tiles);
announce ``ready = e``; wait all ``ready >= e``; each program sums its tiles of chunk ``rank``
over every rank's staging in rank order and writes ``out``; announce ``done = e``. Each rank reads
``(world - 1) m`` elements over NVLink.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import DONE, REDUCTION_DTYPES, ReductionContext, announce, reduce_tiles, stage_and_publish

DTYPES = REDUCTION_DTYPES
METHODS = ("full_mesh",)


@triton.jit
def _full_mesh_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, chunk, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, dl.num_ranks() * chunk,
                                                    BLOCK)
    reduce_tiles(base, out_ptr, rank * chunk, rank * chunk + chunk, rank * chunk, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, nprog, rank, world)


class ReduceScatterContext(ReductionContext):
    """Staging for reduce-scatters of inputs of up to ``max_numel`` elements of ``dtype``."""

    op = "reduce_scatter"


def reduce_scatter(x: torch.Tensor, *, ctx: ReduceScatterContext, method: str = "auto",
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``x`` (``(world*m, ...)``) over ranks and keep chunk ``rank`` (``(m, ...)``); no host sync."""
    ctx.check(x)
    world = ctx.world.world_size
    if x.dim() == 0 or x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 of x ({tuple(x.shape)}) must be a multiple of the world size "
                         f"{world}")
    if method not in ("auto",) + METHODS:
        raise ValueError(f"reduce_scatter: method must be 'auto' or one of {METHODS}, got {method!r}")
    shape = (x.shape[0] // world, *x.shape[1:])
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"reduce_scatter: out must be a contiguous {shape} {x.dtype} tensor")
    chunk = x.numel() // world
    if chunk == 0:
        return out
    block = 1024 if ctx.world.interpreted else 2048  # fixed per context: tiles own staging bytes
    epoch = ctx.next_epoch()
    _full_mesh_kernel[(ctx.num_programs,)](x, out, ctx.staging_as(x.dtype, x.numel()), ctx.pad, epoch, chunk,
                                           BLOCK=block, num_warps=8)
    return out


def reduce_scatter_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed: all-reduce in fp32 and slice (gloo has no reduce_scatter_tensor)."""
    world = triton_dist.current_world()
    acc = x.to(torch.float32)
    dist.all_reduce(acc, group=world.group)
    m = x.shape[0] // world.world_size
    return acc[world.rank * m:(world.rank + 1) * m].to(x.dtype)
