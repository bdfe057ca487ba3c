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

The sums are taken in rank order on every rank, so all ranks get bit-identical results.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import CollectiveContext, announce, await_all, check_collective_input, copy_blocks, tile_span

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("one_shot", "two_shot")
ONE_SHOT_MAX_BYTES = 512 << 10  # auto: one-shot up to here, two-shot above (4x H100 crossover, docs/perf/NOTES.md)


@triton.jit
def _sum_peers(base, offs, mask, world, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in range(world):
        acc += tl.load(dl.symm_at(base, peer) + offs, mask=mask).to(tl.float32)
    return acc


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, BLOCK: tl.constexpr):
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = tl.load(epoch_ptr)
    await_all(pad_ptr, 2, e - 1, nprog, world)  # peers finished reading the previous call's staging
    copy_blocks(x_ptr, staging_ptr, 0, n, nprog, BLOCK)
    announce(pad_ptr, 0, e, nprog, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, 0, e, nprog, world))
    t0, t1, step = tile_span(0, n, 0, nprog, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = _sum_peers(base, offs, mask, world, BLOCK)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    announce(pad_ptr, 2, e, nprog, rank, world)


@triton.jit
def _two_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, BLOCK: tl.constexpr):
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = tl.load(epoch_ptr)
    await_all(pad_ptr, 2, e - 1, nprog, world)
    copy_blocks(x_ptr, staging_ptr, 0, n, nprog, BLOCK)
    announce(pad_ptr, 0, e, nprog, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, 0, e, nprog, world))
    # reduce-scatter: my chunk, summed over every rank's staging, into out and back into my staging
    lo = rank * chunk
    hi = tl.minimum(lo + chunk, n)
    t0, t1, step = tile_span(lo, hi, 0, nprog, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = (offs >= lo) & (offs < hi)
        acc = _sum_peers(base, offs, mask, world, BLOCK).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, acc, mask=mask)
        tl.store(base + offs, acc, mask=mask)
    announce(pad_ptr, 1, e, nprog, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, 1, e, nprog, world))
    # all-gather: the other ranks' reduced chunks (the same blocks of each chunk as this program reduced)
    for i in range(1, world):
        src = (rank + i) % world
        lo = src * chunk
        hi = tl.minimum(lo + chunk, n)
        copy_blocks(dl.symm_at(base, src), out_ptr, lo, hi, nprog, BLOCK)
    announce(pad_ptr, 2, e, nprog, rank, world)


class AllReduceContext(CollectiveContext):
    """Staging for all-reduces of up to ``max_numel`` elements of ``dtype``; reuse it for every call."""

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"all_reduce: dtype {dtype} is not supported; expected bf16, fp16 or fp32")
        self.max_numel = max_numel
        self.dtype = dtype
        super().__init__(max_numel * torch.empty((), dtype=dtype).element_size(), regions=3,
                         num_programs=num_programs)


def pick_method(nbytes: int) -> str:
    """The automatic choice: one-shot for small messages (latency), two-shot for large ones (bandwidth)."""
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "two_shot"


def all_reduce(x: torch.Tensor, *, ctx: AllReduceContext, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``x`` over all ranks (fp32 accumulation); returns ``out`` (new tensor if None). No host sync."""
    check_collective_input(x, "all_reduce", DTYPES)
    if x.dtype != ctx.dtype or x.numel() > ctx.max_numel:
        raise ValueError(f"all_reduce: context is for up to {ctx.max_numel} elements of {ctx.dtype}, got "
                         f"{x.numel()} of {x.dtype}")
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
    staging = ctx.staging_as(x.dtype, n)
    epoch = ctx.next_epoch()
    grid = (ctx.num_programs,)
    if method == "one_shot":
        _one_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, BLOCK=block, num_warps=8)
    else:
        chunk = triton.cdiv(n, ctx.world.world_size)
        _two_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, chunk, BLOCK=block, num_warps=8)
    return out


def all_reduce_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed: sum in fp32, cast back."""
    acc = x.to(torch.float32)
    dist.all_reduce(acc, group=triton_dist.current_world().group)
    return acc.to(x.dtype)
