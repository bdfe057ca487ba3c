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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.runtime.heap import SUPPORTED_DTYPES

from ._common import (DONE, READY, CollectiveContext, announce, await_all, check_collective_input, copy_blocks,
                      push_and_publish, stage_and_publish)

METHODS = ("pull", "push", "ring")


@triton.jit
def _pull_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, BLOCK: tl.constexpr):
    rank, world, nprog, e, base = stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, m, 0, BLOCK)
    for i in range(world):
        src = (rank + i) % world
        copy_blocks(dl.symm_at(base, src), out_ptr + src * m, 0, m, nprog, BLOCK)
    announce(pad_ptr, DONE, e, nprog, rank, world)


@triton.jit
def _push_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, BLOCK: tl.constexpr):
    # slot `rank` of every staging; tiles owned by absolute staging position (base rank * m), the same layout as
    # pull and ring, so switching methods needs no wider wait (wait_all = 0)
    rank, world, nprog, e, base = push_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, m, dl.rank() * m,
                                                   dl.rank() * m, 0, BLOCK)
    for src in range(world):
        copy_blocks(base + src * m, out_ptr + src * m, 0, m, nprog, BLOCK, src * m)
    announce(pad_ptr, DONE, e, nprog, rank, world)


@triton.jit
def _ring_kernel(x_ptr, out_ptr, staging_ptr, pad_ptr, epoch_ptr, m, BLOCK: tl.constexpr):
    """Ring: store my x into slot ``rank`` of my staging and my right neighbour's; then world-2 times forward the
    slot that just arrived from the left to the right. Slot signals: ``READY[p][src]`` on the receiver."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr)
    right = (rank + 1) % world
    await_all(pad_ptr, DONE, e - 1, nprog, world)  # everyone copied the previous call's staging out
    ready = pad_ptr + (READY * nprog + pid) * world
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
    base = dl.consume_token(staging_ptr, dl.wait(ready + src, 1, "sys", "acquire", e, cmp="ge"))
    for s in range(world):
        copy_blocks(base + s * m, out_ptr + s * m, 0, m, nprog, BLOCK, s * m)
    announce(pad_ptr, DONE, e, nprog, rank, world)


class AllGatherContext(CollectiveContext):
    """Staging for all-gathers of up to ``max_numel`` elements per rank (``world * max_numel`` for push)."""

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        world = triton_dist.current_world().world_size
        self.max_numel = max_numel
        self.dtype = dtype
        super().__init__(world * max_numel * torch.empty((), dtype=dtype).element_size(), regions=3,
                         num_programs=num_programs)


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
    method = "pull" if method == "auto" else method
    if method not in METHODS:
        raise ValueError(f"all_gather: method must be 'auto' or one of {METHODS}, got {method!r}")
    shape = (world * x.shape[0], *x.shape[1:])
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"all_gather: out must be a contiguous {shape} {x.dtype} tensor")
    if x.numel() == 0:
        return out
    word = _word_dtype(x.numel() * x.element_size())
    xw, outw = x.reshape(-1).view(torch.uint8).view(word), out.reshape(-1).view(torch.uint8).view(word)
    m = xw.numel()
    staging = ctx.staging.view(word)
    block = 1024 if ctx.world.interpreted else 4096  # fixed per context: tiles own staging bytes
    epoch = ctx.next_epoch()
    kernel = {"pull": _pull_kernel, "push": _push_kernel, "ring": _ring_kernel}[method]
    kernel[(ctx.num_programs,)](xw, outw, staging, ctx.pad, epoch, m, BLOCK=block, num_warps=8)
    return out


def all_gather_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.distributed.all_gather (into a list, then concatenated)."""
    world = triton_dist.current_world()
    parts = [torch.empty_like(x) for _ in range(world.world_size)]
    dist.all_gather(parts, x.contiguous(), group=world.group)
    return torch.cat(parts, dim=0)
