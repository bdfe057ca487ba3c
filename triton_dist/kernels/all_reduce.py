"""AllReduce (sum) over the symmetric heap: one-shot and two-shot, fp32 accumulation.

Shards: every rank holds ``x`` (any shape, n elements); every rank gets ``sum_r x_r`` with the same shape.

Both methods stage ``x`` in the context's symmetric buffer and use the epoch protocol of ``_common.py``
(regions: 0 ``ready``, 1 ``reduced``, 2 ``done``); program ``p`` owns the staging tiles ``p, p + P, p + 2P, ...``
(fixed tiles, whatever the size of the call).

* one-shot (latency): wait ``done >= e-1``; copy my blocks of ``x`` to staging; announce ``ready = e``; wait all
  ``ready >= e``; for each block sum the peers' staging in rank order (fp32) into ``out``; announce ``done = e``.
  Every rank reads ``(n-1) x`` bytes over NVLink.
* two-shot (bandwidth): rank ``r`` owns chunk ``r`` (``ceil(n / world)`` elements). After ``ready``, each program
  reduces its blocks of *my* chunk from every peer and writes the sum to ``out`` and back into my staging;
  announce ``reduced = e``; wait all ``reduced >= e``; copy the peers' reduced chunks (my blocks of them) into
  ``out``; announce ``done = e``. Every rank reads ``2 (n-1)/world x`` bytes.
* push_one_shot (low latency, opt-in until measured): store ``x`` into slot ``rank`` of every rank's staging,
  announce ``ready``; after the single round every rank sums its own slots from local memory.

The sums are taken in rank order on every rank, so all ranks get bit-identical results.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import (DONE, REDUCED, REDUCTION_DTYPES, ReductionContext, announce, await_all, copy_blocks,
                      push_and_publish, reduce_tiles, stage_and_publish, tile_span)

DTYPES = REDUCTION_DTYPES
METHODS = ("one_shot", "two_shot", "push_one_shot")
# auto: one-shot up to here, two-shot above. On 4x H100 one-shot won at 64 KiB and lost at 1 MiB (NOTES.md); the
# crossover inside that interval is not measured yet.
ONE_SHOT_MAX_BYTES = 512 << 10


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, BLOCK)
    reduce_tiles(base, out_ptr, 0, n, 0, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, nprog, rank, world)


@triton.jit
def _two_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, wait_all, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, BLOCK)
    # reduce-scatter: my chunk, summed over every rank's staging, into out and back into my staging
    reduce_tiles(base, out_ptr, rank * chunk, tl.minimum(rank * chunk + chunk, n), 0, world, nprog, BLOCK, True)
    announce(pad_ptr, REDUCED, e, nprog, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, REDUCED, e, nprog, world))
    # all-gather: the other ranks' reduced chunks (the same tiles as this program reduced on each rank)
    for i in range(1, world):
        src = (rank + i) % world
        copy_blocks(dl.symm_at(base, src), out_ptr, src * chunk, tl.minimum(src * chunk + chunk, n), nprog, BLOCK)
    announce(pad_ptr, DONE, e, nprog, rank, world)


@triton.jit
def _push_one_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, slot, wait_all, BLOCK: tl.constexpr):
    """Low-latency variant: push ``x`` into slot ``rank`` of every rank's staging (NVLink stores, no remote loads
    after the hand-off), one READY round, then sum the local slots. Slots start at fixed multiples of ``slot``, so
    tile ownership (relative to the slot start) is the same in every call."""
    rank, world, nprog, e, base = push_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, dl.rank() * slot, 0,
                                                   wait_all, BLOCK)
    t0, t1, step = tile_span(0, n, 0, nprog, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for src in range(world):
            acc += tl.load(base + src * slot + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    announce(pad_ptr, DONE, e, nprog, rank, world)


class AllReduceContext(ReductionContext):
    """Staging for all-reduces of up to ``max_numel`` elements of ``dtype``; reuse it for every call."""

    op = "all_reduce"


def pick_method(nbytes: int) -> str:
    """The automatic choice: one-shot for small messages (latency), two-shot for large ones (bandwidth)."""
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "two_shot"


def all_reduce(x: torch.Tensor, *, ctx: AllReduceContext, method: str = "auto",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``x`` over all ranks (fp32 accumulation); returns ``out`` (new tensor if None). No host sync.

    ``push_one_shot`` needs ``world * x.numel()`` elements of context (one slot per rank)."""
    ctx.check(x)
    method = pick_method(x.numel() * x.element_size()) if method == "auto" else method
    if method not in METHODS:
        raise ValueError(f"all_reduce: method must be 'auto' or one of {METHODS}, got {method!r}")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"all_reduce: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    n = x.numel()
    if n == 0:
        return out
    block = 1024 if ctx.world.interpreted else 2048  # fixed per context: tiles own staging bytes
    if method == "push_one_shot":
        slot = ctx.max_numel // ctx.world.world_size
        if n > slot:
            raise ValueError(f"all_reduce: push_one_shot needs world * numel = {ctx.world.world_size * n} elements "
                             f"of context, the context has {ctx.max_numel}")
    staging = ctx.staging_as(x.dtype, ctx.max_numel if method == "push_one_shot" else n)
    wait_all = ctx.layout_switch("slots" if method == "push_one_shot" else "flat")
    epoch = ctx.next_epoch()
    grid = (ctx.num_programs,)
    if method == "push_one_shot":
        _push_one_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, slot, wait_all, BLOCK=block, num_warps=8)
    elif method == "one_shot":
        _one_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, wait_all, BLOCK=block, num_warps=8)
    else:
        chunk = triton.cdiv(n, ctx.world.world_size)
        _two_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, chunk, wait_all, BLOCK=block, num_warps=8)
    return out


def all_reduce_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed: sum in fp32, cast back."""
    acc = x.to(torch.float32)
    dist.all_reduce(acc, group=triton_dist.current_world().group)
    return acc.to(x.dtype)
