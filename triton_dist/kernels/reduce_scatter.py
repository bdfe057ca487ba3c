"""ReduceScatter (sum), full mesh, fp32 accumulation.

Shards: every rank holds ``x`` of shape ``(world * m, ...)``; rank ``r`` gets ``sum_q x_q[r*m:(r+1)*m]`` of shape
``(m, ...)`` (the semantics of ``torch.distributed.reduce_scatter_tensor``).

Protocol (``_common.py``; regions 0 ``ready``, 2 ``done``): wait ``done >= e-1``; stage ``x`` (fixed tiles);
announce ``ready = e``; wait all ``ready >= e``; each program sums its tiles of chunk ``rank``
over every rank's staging in rank order and writes ``out``; announce ``done = e``. Each rank reads
``(world - 1) m`` elements over NVLink.

Push (large messages): no staging copy and no NVLink loads. Rank ``r`` stores its chunk ``c`` of ``x`` into slot
``r`` of rank ``c``'s staging (NVLink stores, the faster direction; slots are ``ceil(m / BLOCK)`` whole tiles apart so
tile ownership is the same for writer and reader); announce ``ready = e``; wait all; each program sums its tiles over
the slots in rank order, taking its own chunk straight from ``x``; announce ``done = e``.

Ring: ``world - 1`` steps; at step ``s`` each rank adds its own chunk ``rank-1-s`` to the fp32 partial sum that
arrived from the left and passes it on to the right; the last step lands on chunk ``rank``. Partials travel in
fp32 (twice the bytes of bf16, but one rounding at the end, as in full mesh).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import (DONE, READY, REDUCTION_DTYPES, ReductionContext, announce, await_previous, call_signature,
                      check_signatures, publish_signature, reduce_slots, reduce_tiles, scatter_and_publish,
                      signal_slots, stage_and_publish, take_epoch, tile_span)

DTYPES = REDUCTION_DTYPES
METHODS = ("full_mesh", "push", "ring")
# auto, from the 4x H100 run of 2026-11-28: push fastest except for 4-16 MiB per rank output, where full_mesh won
FULL_MESH_BYTES = (4 << 20, 32 << 20)  # per-rank output bytes [lo, hi) where auto takes full_mesh


@triton.jit(do_not_specialize=["sig"])
def _full_mesh_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, chunk, wait_all, sig, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, dl.num_ranks() * chunk,
                                                    wait_all, sig, BLOCK)
    reduce_tiles(base, out_ptr, rank * chunk, rank * chunk + chunk, rank * chunk, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _ring_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, chunk, wait_all, sig, BLOCK: tl.constexpr):
    """Ring: fp32 partial sums travel to the right; after world-1 steps chunk ``rank`` holds the full sum.
    ``staging_ptr`` is fp32, one slot of ``chunk`` per chunk index; ``READY[p][c]`` on the receiver says that
    slot ``c``'s tiles of program p arrived. Signatures go to every rank first and are checked once my chunk, which
    passed every other rank, has arrived."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = take_epoch(epoch_ptr)
    right = (rank + 1) % world
    ready = signal_slots(pad_ptr, READY, world)
    await_previous(pad_ptr, e, world, wait_all)
    publish_signature(pad_ptr, sig, rank, world)
    c = (rank - 1 + world) % world
    t0, t1, step_t = tile_span(c * chunk, c * chunk + chunk, 0, nprog, BLOCK)
    for t in range(t0, t1, step_t):  # step 0: my x of chunk c, as fp32, into the right neighbour's slot c
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = (offs >= c * chunk) & (offs < c * chunk + chunk)
        tl.store(dl.symm_at(staging_ptr, right) + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float32), mask=mask)
    dl.notify(ready + c, right, e, "set", "intra_node")
    for step in range(1, world):
        c = (rank - 1 - step + 2 * world) % world  # the chunk that just arrived from the left
        base = dl.consume_token(staging_ptr, dl.wait(ready + c, 1, "sys", "acquire", e, cmp="ge"))
        t0, t1, step_t = tile_span(c * chunk, c * chunk + chunk, 0, nprog, BLOCK)
        for t in range(t0, t1, step_t):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            mask = (offs >= c * chunk) & (offs < c * chunk + chunk)
            part = tl.load(base + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            if step < world - 1:
                tl.store(dl.symm_at(base, right) + offs, part, mask=mask)
            else:  # c == rank: the full sum
                tl.store(out_ptr + (offs - c * chunk), part.to(out_ptr.dtype.element_ty), mask=mask)
        if step < world - 1:
            dl.notify(ready + c, right, e, "set", "intra_node")
    check_signatures(pad_ptr, sig, world, dl.wait(ready + rank, 1, "sys", "acquire", e, cmp="ge"))  # arrived already
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _push_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, chunk, slot, wait_all, sig, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = scatter_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr,
                                                      dl.num_ranks() * chunk, chunk, slot, wait_all, sig, BLOCK)
    reduce_slots(x_ptr + rank * chunk, base, slot, chunk, out_ptr, out_ptr, rank, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, rank, world)


class ReduceScatterContext(ReductionContext):
    """Staging for reduce-scatters of inputs of up to ``max_numel`` elements of ``dtype`` (fp32 room, for the ring's
    partial sums)."""

    op = "reduce_scatter"
    staging_elem_bytes = 4


def reduce_scatter(x: torch.Tensor, *, ctx: ReduceScatterContext, method: str = "auto",
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``x`` (``(world*m, ...)``) over ranks and keep chunk ``rank`` (``(m, ...)``); no host sync."""
    ctx.check(x)
    world = ctx.world.world_size
    if x.dim() == 0:
        raise ValueError(f"reduce_scatter: x is a 0-d tensor (a scalar); expected (world * m, ...) with world = {world}"
                         ": rows along dim 0, chunk r of them for rank r")
    if x.shape[0] % world:
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
    block = ctx.tile_elems(x.numel() * x.element_size())  # tiles own staging bytes: part of the layout key
    if world == 1:
        return out.copy_(x)
    if method == "auto":
        lo, hi = FULL_MESH_BYTES
        method = "full_mesh" if lo <= chunk * x.element_size() < hi else "push"
    programs = ctx.programs_for(chunk, block)
    wait_all = ctx.layout_switch(f"{method}/{block}", programs)  # ring stages fp32, full mesh the input dtype
    epoch = ctx.call_counters()
    sig = call_signature("reduce_scatter", method, x.dtype, x.numel())
    if method == "push":
        slot = triton.cdiv(chunk, block) * block
        staging = ctx.staging_as(x.dtype, world * slot)
        _push_kernel[(programs,)](x, out, staging, ctx.pad, epoch, chunk, slot, wait_all, sig, BLOCK=block,
                                  num_warps=8)
        return out
    kernel, staging_dtype = (_ring_kernel, torch.float32) if method == "ring" else (_full_mesh_kernel, x.dtype)
    kernel[(programs,)](x, out, ctx.staging_as(staging_dtype, x.numel()), ctx.pad, epoch, chunk, wait_all, sig,
                        BLOCK=block, num_warps=8)
    return out


def reduce_scatter_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed: all-reduce in fp32 and slice (gloo has no reduce_scatter_tensor)."""
    world = triton_dist.current_world()
    acc = x.to(torch.float32)
    dist.all_reduce(acc, group=world.group)
    m = x.shape[0] // world.world_size
    return acc[world.rank * m:(world.rank + 1) * m].to(x.dtype)
