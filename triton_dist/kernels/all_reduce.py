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
* push_two_shot (bandwidth, no staging copy): rank ``r`` stores its chunk ``c`` of ``x`` into slot ``r`` of rank
  ``c``'s staging (NVLink stores); after ``ready`` each rank sums its slots in rank order (its own chunk straight
  from ``x``) into ``out`` and into a reduced area of its staging; announce ``reduced``; then pull the peers'
  reduced chunks as two-shot does. Slots are whole tiles apart (aligned, same tile owners for writer and reader).
* ll (lowest latency, messages up to ``_ll.LL_MAX_BYTES``): the LL protocol of ``_ll.py``: every rank stores its
  32-bit words, each packed with the epoch as flag, into its slot of every rank's LL buffer; each rank polls its
  own buffer until every word of every slot carries this epoch and sums. No signals, no fences, no staging copy:
  one NVLink hop per call.

The sums are taken in rank order on every rank, so all ranks get bit-identical results.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import (DONE, REDUCED, REDUCTION_DTYPES, ReductionContext, announce, await_all, call_signature,
                      copy_blocks, push_and_publish, reduce_slots, reduce_tiles, scatter_and_publish,
                      stage_and_publish, take_epoch)
from ._ll import LL_MAX_BYTES, LLBuffer, ll_lanes, ll_recv, ll_send_all

DTYPES = REDUCTION_DTYPES
METHODS = ("one_shot", "two_shot", "push_one_shot", "ll", "push_two_shot")
# auto, from the 4x H100 run of 2026-11-28 (NOTES.md): ll was fastest up to 256 KiB (8-14 us), push_two_shot from
# 4 MiB up and within 4% of push_one_shot at 1 MiB; one_shot is never picked (ONE_SHOT_MAX_BYTES = 0).
LL_AUTO_MAX_BYTES = 256 << 10
ONE_SHOT_MAX_BYTES = 0
LARGE_METHOD = "push_two_shot"


@triton.jit(do_not_specialize=["sig"])
def _one_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, sig, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, sig, BLOCK)
    reduce_tiles(base, out_ptr, 0, n, 0, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _two_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, wait_all, sig,
                     BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, sig, BLOCK)
    # reduce-scatter: my chunk, summed over every rank's staging, into out and back into my staging
    reduce_tiles(base, out_ptr, rank * chunk, tl.minimum(rank * chunk + chunk, n), 0, world, nprog, BLOCK, True)
    announce(pad_ptr, REDUCED, e, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, REDUCED, e, world))
    # all-gather: the other ranks' reduced chunks (the same tiles as this program reduced on each rank)
    for i in range(1, world):
        src = (rank + i) % world
        copy_blocks(dl.symm_at(base, src), out_ptr, src * chunk, tl.minimum(src * chunk + chunk, n), nprog, BLOCK)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _push_one_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, slot, wait_all, sig,
                          BLOCK: tl.constexpr):
    """Low-latency variant: push ``x`` into slot ``rank`` of every rank's staging (NVLink stores, no remote loads
    after the hand-off), one READY round, then sum the local slots. Slots start at fixed multiples of ``slot``, so
    tile ownership (relative to the slot start) is the same in every call."""
    rank, world, nprog, e, base = push_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, dl.rank() * slot, 0,
                                                   wait_all, sig, BLOCK)
    reduce_slots(x_ptr, base, slot, n, out_ptr, out_ptr, rank, world, nprog, BLOCK, False)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _ll_kernel(x_ptr, out_ptr, buf_ptr, epoch_ptr, n, words, slot_words, sig, pad_ptr, pad_counters_ptr,
               HALF: tl.constexpr, BLOCK: tl.constexpr):
    """LL all-reduce: send every tile, then sum every rank's words in rank order. ``x_ptr`` is an int16 (``HALF``)
    or int32 view of x, ``out_ptr`` the typed output."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = take_epoch(epoch_ptr)
    ll_send_all(x_ptr, n, words, buf_ptr, slot_words, e, rank, world, sig, HALF, BLOCK)
    dtype = out_ptr.dtype.element_ty
    for t in range(tl.program_id(0), tl.cdiv(words, BLOCK), tl.num_programs(0)):
        w, mask = ll_lanes(t, words, BLOCK)
        lo = tl.zeros([BLOCK], dtype=tl.float32)
        hi = tl.zeros([BLOCK], dtype=tl.float32)
        for src in range(world):
            v = ll_recv(buf_ptr, slot_words, w, e, src, world, sig, pad_ptr, pad_counters_ptr)
            if HALF:
                lo += v.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
                hi += (v >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
            else:
                lo += v.to(dtype, bitcast=True).to(tl.float32)
        if HALF:
            tl.store(out_ptr + 2 * w, lo.to(dtype), mask=mask)
            tl.store(out_ptr + 2 * w + 1, hi.to(dtype), mask=mask & (2 * w + 1 < n))
        else:
            tl.store(out_ptr + w, lo.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["sig"])
def _push_two_shot_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, slot, wait_all, sig,
                          BLOCK: tl.constexpr):
    rank, world, nprog, e, base = scatter_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, slot,
                                                      wait_all, sig, BLOCK)
    mine = tl.minimum(chunk, n - rank * chunk)  # my reduced chunk goes to out and to the peers (after the slots)
    reduce_slots(x_ptr + rank * chunk, base, slot, mine, out_ptr + rank * chunk, base + world * slot, rank, world,
                 nprog, BLOCK, True)
    announce(pad_ptr, REDUCED, e, rank, world)
    base = dl.consume_token(staging_ptr, await_all(pad_ptr, REDUCED, e, world))
    for i in range(1, world):
        src = (rank + i) % world
        lo = src * chunk
        copy_blocks(dl.symm_at(base + world * slot, src), out_ptr + lo, 0, tl.minimum(chunk, n - lo), nprog, BLOCK)
    announce(pad_ptr, DONE, e, rank, world)


class AllReduceContext(ReductionContext):
    """Staging for all-reduces of up to ``max_numel`` elements of ``dtype`` (and an LL buffer for up to
    ``LL_MAX_BYTES`` of them); reuse it for every call."""

    op = "all_reduce"
    push_areas = 1  # push_two_shot: the world slots plus my reduced chunk

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        super().__init__(max_numel, dtype, num_programs=num_programs)
        nbytes = max_numel * torch.empty((), dtype=dtype).element_size()
        self.ll = LLBuffer(min(nbytes, LL_MAX_BYTES), 256 if self.world.interpreted else 1024, self.num_programs,
                           self.op)

    def close(self) -> None:
        super().close()
        self.ll.close()


def pick_method(nbytes: int) -> str:
    """The automatic choice: ll, then one-shot for small messages (latency), two-shot for large ones (bandwidth)."""
    if nbytes <= LL_AUTO_MAX_BYTES:
        return "ll"
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else LARGE_METHOD


def all_reduce(x: torch.Tensor, *, ctx: AllReduceContext, method: str = "auto",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``x`` over all ranks (fp32 accumulation); returns ``out`` (new tensor if None). No host sync.

    ``push_one_shot`` needs ``world * x.numel()`` elements of context (one slot per rank)."""
    ctx.check(x)
    if method == "auto":
        method = pick_method(x.numel() * x.element_size())
        if method == "ll" and x.numel() * x.element_size() > ctx.ll.max_bytes:
            method = "one_shot"
    if method not in METHODS:
        raise ValueError(f"all_reduce: method must be 'auto' or one of {METHODS}, got {method!r}")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"all_reduce: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    n = x.numel()
    if n == 0:
        return out
    if method == "ll":
        return _ll_all_reduce(x, out, ctx)
    block = ctx.tile_elems(n * x.element_size())  # tiles own staging bytes: part of the layout key
    if method == "push_one_shot":
        slot = ctx.max_numel // ctx.world.world_size
        if n > slot:
            raise ValueError(f"all_reduce: push_one_shot needs world * numel = {ctx.world.world_size * n} elements "
                             f"of context, the context has {ctx.max_numel}")
    chunk = triton.cdiv(n, ctx.world.world_size)
    if method == "push_two_shot":
        chunk_slot = triton.cdiv(chunk, block) * block
        staging = ctx.staging_as(x.dtype, (ctx.world.world_size + 1) * chunk_slot)
    else:
        staging = ctx.staging_as(x.dtype, ctx.max_numel if method == "push_one_shot" else n)
    programs = ctx.programs_for(n, block)
    layout = {"push_one_shot": "slots", "push_two_shot": "chunk_slots"}.get(method, "flat")
    wait_all = ctx.layout_switch(f"{layout}/{block}", programs)
    epoch = ctx.call_counters()
    sig = call_signature("all_reduce", method, x.dtype, n)
    grid = (programs,)
    if method == "push_two_shot":
        _push_two_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, chunk, chunk_slot, wait_all, sig, BLOCK=block,
                                    num_warps=8)
    elif method == "push_one_shot":
        _push_one_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, slot, wait_all, sig, BLOCK=block,
                                    num_warps=8)
    elif method == "one_shot":
        _one_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, wait_all, sig, BLOCK=block, num_warps=8)
    else:
        _two_shot_kernel[grid](x, out, staging, ctx.pad, epoch, n, chunk, wait_all, sig, BLOCK=block, num_warps=8)
    return out


def _ll_all_reduce(x: torch.Tensor, out: torch.Tensor, ctx: AllReduceContext) -> torch.Tensor:
    nbytes = x.numel() * x.element_size()
    if nbytes > ctx.ll.max_bytes:
        raise ValueError(f"all_reduce: method 'll' is for messages of at most {ctx.ll.max_bytes} bytes with this "
                         f"context (LL_MAX_BYTES = {LL_MAX_BYTES}), got {nbytes}")
    half = x.element_size() == 2
    words = -(-nbytes // 4)
    block = ctx.ll.block_words
    epoch = ctx.ll.counters
    _ll_kernel[(ctx.programs_for(words, block),)](x.view(torch.int16 if half else torch.int32), out, ctx.ll.buf,
                                                  epoch, x.numel(), words, ctx.ll.slot_words,
                                                  call_signature("all_reduce", "ll", x.dtype, x.numel()), ctx.pad,
                                                  ctx.counters, HALF=half, BLOCK=block, num_warps=4)
    return out


def all_reduce_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed: sum in fp32, cast back."""
    acc = x.to(torch.float32)
    dist.all_reduce(acc, group=triton_dist.current_world().group)
    return acc.to(x.dtype)
