"""AllGather, full mesh: pull (default) and push.

Shards: every rank holds ``x`` of shape ``(m, ...)``; every rank gets ``(world * m, ...)`` with rank ``r``'s ``x`` at
rows ``r*m:(r+1)*m`` (``torch.distributed.all_gather_into_tensor``). Data moves as raw words, so any dtype of the
symmetric heap works (bf16, fp16, fp32, fp8, int8, ...).

Protocol (``_common.py``; regions 0 ``ready``, 2 ``done``):

* pull: wait ``done >= e-1``; stage my ``x``; announce ``ready = e``; wait all ``ready >= e``; copy every rank's
  staging (starting with my own, then rank+1, ...) into ``out``; announce ``done = e``.
* push: wait ``done >= e-1`` (peers copied their staging out); store my ``x`` into slot ``rank`` of every rank's
  staging (NVLink stores); announce ``ready = e``; wait all ``ready >= e``; copy my staging to ``out``; announce
  ``done = e``. Push moves the same NVLink bytes as stores (faster than loads, see NOTES.md) but adds a local copy of
  ``world * m`` elements.
* ring: store my ``x`` into my right neighbour's slot ``rank``; ``world - 2`` times wait for the slot that arrived
  from the left and forward it to the right; then copy the staging out. Each rank sends ``(world - 1) m`` over one
  link, the others idle: the variant for topologies without a switch.
* copy_engine: the data moves by DMA (``copy_`` of peers' staging through their peer views, stream-ordered), the
  SMs only run three one-program signal kernels: wait ``done >= e-1``; (copy engine: my ``x`` into my staging and
  into ``out``); announce ``ready = e`` and wait all ``ready >= e``; (copy engine: every peer's staging into
  ``out``, starting at rank+1); announce ``done = e``. Leaves the SMs free for a concurrent kernel (AG+GEMM).
* ll (small messages of whole 32-bit words, up to ``_ll.LL_MAX_BYTES``): the LL protocol of ``_ll.py``: my words,
  each packed with the epoch as flag, go straight into my slot of every rank's LL buffer; each rank polls its own
  buffer and copies the words out. One NVLink hop, no signals or fences.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.runtime.heap import SUPPORTED_DTYPES

from ._common import (DONE, READY, CollectiveContext, announce, await_previous, call_signature,
                      check_collective_input, check_signatures, copy_blocks, copy_engine_exchange, publish_signature,
                      push_and_publish, signal_slots, stage_and_publish, take_epoch)
from ._ll import LL_MAX_BYTES, LLBuffer, ll_lanes, ll_recv, ll_send_all

METHODS = ("pull", "push", "ring", "ll", "copy_engine")
# auto, from the 4x H100 run of 2026-11-28: ll up to 256 KiB per rank (1.5-1.9x NCCL), pull up to 16 MiB,
# copy_engine from 64 MiB (pull 262 vs copy engine 275 GB/s at 64 MiB)
LL_AUTO_MAX_BYTES = 256 << 10
COPY_ENGINE_MIN_BYTES = 32 << 20


@triton.jit(do_not_specialize=["sig"])
def _pull_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, wait_all, sig, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, m, wait_all, sig, BLOCK)
    for i in range(world):
        src = (rank + i) % world
        copy_blocks(dl.symm_at(base, src), out_ptr + src * m, 0, m, nprog, BLOCK)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _push_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, wait_all, sig, BLOCK: tl.constexpr):
    # slot `rank` of every staging; tiles owned by absolute staging position (base rank * m), the same layout as
    # pull and ring, so switching methods needs no wider wait (only a change of program count does)
    rank, world, nprog, e, base = push_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, m, dl.rank() * m,
                                                   dl.rank() * m, wait_all, sig, BLOCK)
    for src in range(world):
        copy_blocks(base + src * m, out_ptr + src * m, 0, m, nprog, BLOCK, src * m)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _ring_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, wait_all, sig, BLOCK: tl.constexpr):
    """Ring: store my x into slot ``rank`` of my staging and my right neighbour's; then world-2 times forward the
    slot that just arrived from the left to the right. Slot signals: ``READY[p][src]`` on the receiver. Signatures go
    to every rank first; the last arrival (a chain of release/acquire hand-offs from every rank) makes them visible."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = take_epoch(epoch_ptr)
    right = (rank + 1) % world
    await_previous(pad_ptr, e, world, wait_all)  # everyone copied the previous call's staging out
    publish_signature(pad_ptr, sig, rank, world)
    ready = signal_slots(pad_ptr, READY, world)
    copy_blocks(x_ptr, staging_ptr + rank * m, 0, m, nprog, BLOCK, rank * m)
    copy_blocks(x_ptr, dl.symm_at(staging_ptr + rank * m, right), 0, m, nprog, BLOCK, rank * m)
    dl.notify(ready + rank, right, e, "set", "intra_node")
    for step in range(1, world - 1):
        src = (rank - step + world) % world
        token = dl.wait(ready + src, 1, "sys", "acquire", e, cmp="ge")
        slot = dl.consume_token(staging_ptr, token) + src * m
        copy_blocks(slot, dl.symm_at(slot, right), 0, m, nprog, BLOCK, src * m)
        dl.notify(ready + src, right, e, "set", "intra_node")
    src = (rank + 1) % world  # the last slot to arrive (from the left) is the right neighbour's
    token = dl.wait(ready + src, 1, "sys", "acquire", e, cmp="ge")
    check_signatures(pad_ptr, sig, world, token)
    base = dl.consume_token(staging_ptr, token)
    for s in range(world):
        copy_blocks(base + s * m, out_ptr + s * m, 0, m, nprog, BLOCK, s * m)
    announce(pad_ptr, DONE, e, rank, world)


@triton.jit(do_not_specialize=["sig"])
def _ll_kernel(x_ptr, out_ptr, buf_ptr, epoch_ptr, words, slot_words, sig, pad_ptr, pad_counters_ptr,
               BLOCK: tl.constexpr):
    """LL all-gather over int32 words: send every tile, then copy every rank's words out."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = take_epoch(epoch_ptr)
    ll_send_all(x_ptr, words, words, buf_ptr, slot_words, e, rank, world, sig, False, BLOCK)
    for t in range(tl.program_id(0), tl.cdiv(words, BLOCK), tl.num_programs(0)):
        w, mask = ll_lanes(t, words, BLOCK)
        for i in range(world):
            src = (rank + i) % world
            tl.store(out_ptr + src * words + w, ll_recv(buf_ptr, slot_words, w, e, src, world, sig, pad_ptr,
                                                                pad_counters_ptr),
                     mask=mask)


class AllGatherContext(CollectiveContext):
    """Staging for all-gathers of up to ``max_numel`` elements per rank (``world * max_numel`` for push), and an LL
    buffer for up to ``LL_MAX_BYTES`` of them."""

    op = "all_gather"

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        world = triton_dist.current_world().world_size
        self.max_numel = max_numel
        self.dtype = dtype
        nbytes = max_numel * torch.empty((), dtype=dtype).element_size()
        super().__init__(world * nbytes, num_programs=num_programs)
        self.ll = LLBuffer(min(nbytes, LL_MAX_BYTES), 256 if self.world.interpreted else 1024, self.num_programs,
                           self.op)

    def close(self) -> None:
        super().close()
        self.ll.close()


def _word_dtype(nbytes: int) -> torch.dtype:
    """The widest integer word dividing ``nbytes``: data moves as raw words whatever the dtype."""
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0:
            return dtype
    return torch.uint8


def all_gather(x: torch.Tensor, *, ctx: AllGatherContext, method: str = "auto",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather ``x`` (``(m, ...)``) from every rank into ``(world * m, ...)`` in rank order; no host sync."""
    check_collective_input(x, "all_gather", SUPPORTED_DTYPES)
    world = ctx.world.world_size
    if x.dim() == 0:
        raise ValueError("all_gather: x must have at least one dimension")
    if x.dtype != ctx.dtype or x.numel() > ctx.max_numel:
        raise ValueError(f"all_gather: context is for up to {ctx.max_numel} elements of {ctx.dtype} per rank, got "
                         f"{x.numel()} of {x.dtype}")
    nbytes = x.numel() * x.element_size()
    if method == "auto":
        if nbytes % 4 == 0 and nbytes <= min(LL_AUTO_MAX_BYTES, ctx.ll.max_bytes):
            method = "ll"
        else:
            method = "copy_engine" if nbytes >= COPY_ENGINE_MIN_BYTES else "pull"
    if method not in METHODS:
        raise ValueError(f"all_gather: method must be 'auto' or one of {METHODS}, got {method!r}")
    shape = (world * x.shape[0], *x.shape[1:])
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"all_gather: out must be a contiguous {shape} {x.dtype} tensor")
    if x.numel() == 0:
        return out
    if method == "ll" and (nbytes % 4 or nbytes > ctx.ll.max_bytes):
        raise ValueError(f"all_gather: method 'll' needs a whole number of 32-bit words per rank, at most "
                         f"{ctx.ll.max_bytes} bytes with this context (LL_MAX_BYTES = {LL_MAX_BYTES}); got {nbytes}")
    word = _word_dtype(nbytes)
    xw, outw = x.reshape(-1).view(torch.uint8).view(word), out.reshape(-1).view(torch.uint8).view(word)
    m = xw.numel()
    if method == "ll":
        block = ctx.ll.block_words
        _ll_kernel[(ctx.programs_for(m, block),)](xw, outw, ctx.ll.buf, ctx.ll.counters, m, ctx.ll.slot_words,
                                                  call_signature("all_gather", "ll", x.dtype, m), ctx.pad,
                                                  ctx.counters, BLOCK=block, num_warps=4)
        return out
    if method == "copy_engine":
        _copy_engine_all_gather(xw, outw, ctx)
        return out
    staging = ctx.staging.view(word)
    block = 1024 if ctx.world.interpreted else 4096  # fixed per context: tiles own staging bytes
    programs = ctx.programs_for(m, block)
    wait_all = ctx.layout_switch("rank_slots", programs)  # all three methods: rank r's words at staging r * m
    epoch = ctx.call_counters()
    kernel = {"pull": _pull_kernel, "push": _push_kernel, "ring": _ring_kernel}[method]
    sig = call_signature("all_gather", method, x.dtype, m)
    kernel[(programs,)](xw, outw, staging, ctx.pad, epoch, m, wait_all, sig, BLOCK=block, num_warps=8)
    return out


def _copy_engine_all_gather(xw: torch.Tensor, outw: torch.Tensor, ctx: AllGatherContext) -> None:
    m = xw.numel()
    copy_engine_exchange(ctx, xw, lambda src, staged: outw[src * m:(src + 1) * m].copy_(staged[:m]),
                         call_signature("all_gather", "copy_engine", xw.dtype, m))


def all_gather_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed.all_gather (into a list, then concatenated)."""
    world = triton_dist.current_world()
    parts = [torch.empty_like(x) for _ in range(world.world_size)]
    dist.all_gather(parts, x.contiguous(), group=world.group)
    return torch.cat(parts, dim=0)
