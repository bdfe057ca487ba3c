"""AllToAll: every rank sends one block of rows to every rank (itself included), equal or variable splits.

Shard shapes (``W`` ranks, ``me`` this rank, rows along dim 0, any trailing shape ``...``):

* ``all_to_all(x)``: ``x`` is ``(W * m, ...)`` on every rank (the same ``m``); rows ``[j*m, (j+1)*m)`` of ``x`` go
  to rank ``j``; the result is ``(W * m, ...)`` and its rows ``[i*m, (i+1)*m)`` came from rank ``i``. This is
  ``torch.distributed.all_to_all_single(out, x)``.
* ``all_to_all_v(x, in_splits, out_splits)``: ``x`` is ``(sum(in_splits), ...)``; the ``in_splits[j]`` rows
  starting at ``sum(in_splits[:j])`` go to rank ``j``; the result is ``(sum(out_splits), ...)`` and holds, from
  row ``sum(out_splits[:i])``, the ``out_splits[i]`` rows rank ``i`` sent to ``me``. The split lists must agree
  across ranks (``in_splits`` of rank ``i`` at ``j`` == ``out_splits`` of rank ``j`` at ``i``), as for
  ``all_to_all_single(out, x, out_splits, in_splits)``; where they do not, both ranks stop the call with
  :class:`~triton_dist.CallMismatch` naming the ranks and both counts (checked on the device: no host sync).

Data moves as raw words (int64, int32, int16 or uint8: the widest that divides the row size and the alignment of
``x`` and ``out``), so every dtype of the same byte layout works the same way (fp8 and bf16 included).

Protocol: one launch of ``P`` programs per call, epochs as in :mod:`triton_dist.kernels._common` (regions
``READY`` and ``DONE`` of the context's signal pad). The staging buffer (symmetric, a byte copy of ``x``) is
cut into tiles of ``BLOCK`` words, and tile ``t`` belongs to program ``t % P`` on every rank and in every call, so
the bytes a program writes are read only by the programs of the same index on the peers, whatever the shapes and
splits of the call. Program ``p`` of rank ``me``, in call (epoch) ``e``::

    wait DONE[p][*] >= e-1     every peer's program p finished reading my tiles of the previous call
    copy my tiles (t % P == p) of x into my staging; write my (in_offset, in_count, out_count) table row p   [v only]
    announce READY[p] = e on every rank (release: the tiles are visible first)
    wait READY[p][*] >= e      (acquire) every peer's tiles p and table row p hold call e's data
    [v only] check the splits: what I send each peer == what it expects, what each peer sends me == what I expect;
        a difference stops the call on both ranks with CallMismatch (dl.check_agree)
    for every source i: read i's table row p for (offset, count) of the rows i sends me;
        copy the tiles p of that range from i's staging into out at my receive offset for i
    announce DONE[p] = e on every rank (I no longer read the peers' staging of call e)

No program waits for another program of its own rank (only for the program of the same index on the peers, or for
the previous call), so the kernel progresses under the CPU world's interpreter (programs one at a time in pid order)
and on GPUs whose grid does not fit at once. Nothing is reset and nothing is allocated per call, and the epoch is
bumped on the stream, so ``all_to_all`` is CUDA-graph capturable with an explicit context and ``out``.
``all_to_all_v`` takes its splits as host lists and copies them to the device on every call (4 x W int64), which
a graph cannot capture.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels._common import (DONE, READY, CollectiveContext, announce, await_all, await_previous,
                                         call_signature, check_collective_input, check_signatures,
                                         copy_engine_exchange, publish_signature, take_epoch)

__all__ = ["AllToAllContext", "all_to_all", "all_to_all_v", "all_to_all_reference", "all_to_all_v_reference",
           "close_default_context", "default_context", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                    torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


@triton.jit(do_not_specialize=["x_words", "row_words", "m_rows", "nprog", "sig"])
def _all_to_all_kernel(x_ptr, out_ptr, staging_ptr, table_ptr, meta_ptr, pad_ptr, epoch_ptr,
                       x_words, row_words, m_rows, nprog, wait_all, sig,
                       EQUAL: tl.constexpr, BLOCK: tl.constexpr, WORLD_BLOCK: tl.constexpr):
    """One program of the all-to-all; see the module docstring for the protocol.

    ``x_ptr``, ``out_ptr`` and ``staging_ptr`` are word views (the same word type); ``x_words`` is the size of x in
    words, ``row_words`` of one row. ``EQUAL``: every block is ``m_rows`` rows. Otherwise ``meta_ptr`` holds this
    rank's ``[in_offset | in_count | out_offset | out_count]`` (4 x world int64, in rows) and ``table_ptr`` is the
    symmetric (nprog, 3 x world) int64 table through which the peers learn where my rows for them start, how many
    there are, and how many I expect from each of them.
    """
    pid = tl.program_id(0)
    me = dl.rank()
    world = dl.num_ranks()
    epoch = take_epoch(epoch_ptr)
    offs = tl.arange(0, BLOCK)

    # 1. every peer's program pid finished reading my staging tiles (and table row) of the previous call
    token = await_previous(pad_ptr, epoch, world, wait_all)
    staging = dl.consume_token(staging_ptr, token)
    table = dl.consume_token(table_ptr, token)

    # 2. my tiles of x into my staging buffer (same offsets: the staging buffer is a byte copy of x)
    t = pid.to(tl.int64)
    while t * BLOCK < x_words:
        idx = t * BLOCK + offs
        mask = idx < x_words
        tl.store(staging + idx, tl.load(x_ptr + idx, mask=mask), mask=mask)
        t += nprog
    if not EQUAL:
        w_offs = tl.arange(0, WORLD_BLOCK)
        w_mask = w_offs < 2 * world
        row = table + pid * 3 * world
        tl.store(row + w_offs, tl.load(meta_ptr + w_offs, mask=w_mask), mask=w_mask)
        o_mask = w_offs < world
        tl.store(row + 2 * world + w_offs, tl.load(meta_ptr + 3 * world + w_offs, mask=o_mask), mask=o_mask)
    publish_signature(pad_ptr, sig, me, world)
    announce(pad_ptr, READY, epoch, me, world)

    # 3. pull, from every source, the tiles pid of the rows it sends me (once every peer made the same call)
    token = await_all(pad_ptr, READY, epoch, world)
    check_signatures(pad_ptr, sig, world, token)
    staging = dl.consume_token(staging, token)
    table = dl.consume_token(table, token)
    if not EQUAL:  # what I send each peer must be what it expects from me
        for to in range(world):
            expects = tl.load(dl.symm_at(table, to) + pid * 3 * world + 2 * world + me)
            dl.check_agree(tl.load(meta_ptr + world + to), expects, to, 2)
    for k in range(world):
        src = (me + k) % world
        if EQUAL:
            count = tl.cast(m_rows, tl.int64) * row_words
            start = me * count
            dst = src * count
        else:
            row = dl.symm_at(table, src) + pid * 3 * world
            start = tl.load(row + me) * row_words
            expected = tl.load(meta_ptr + 3 * world + src)
            rows = dl.check_agree(expected, tl.load(row + world + me), src, 1)  # what src sends me: what I expect
            count = rows * row_words
            dst = tl.load(meta_ptr + 2 * world + src) * row_words
        peer = dl.symm_at(staging, src)
        end = start + count
        first = start // BLOCK
        t = first + (pid - first % nprog + nprog) % nprog  # the first tile >= first that belongs to pid
        while t * BLOCK < end:
            idx = t * BLOCK + offs
            mask = (idx >= start) & (idx < end)
            tl.store(out_ptr + dst + (idx - start), tl.load(peer + idx, mask=mask), mask=mask)
            t += nprog
    announce(pad_ptr, DONE, epoch, me, world)


class AllToAllContext(CollectiveContext):
    """Staging buffer, split table, signal pad and epoch of the all-to-all, made once and reused by every call.

    ``max_bytes`` bounds the size of ``x`` (in bytes) of any call made with this context; the ranks may pass
    different values (each its own largest ``x``), the context takes the largest over the world. ``dtype``,
    if given, is the only dtype the calls may use (``None``: any of :data:`SUPPORTED_DTYPES`; data moves as raw
    words anyway). ``num_programs``: programs per launch (default: one per SM on GPUs, 2 in the CPU world).
    ``tile_bytes``: the staging buffer is dealt out to the programs in tiles of this many bytes (a power of two;
    default 16 KiB on GPUs, 512 bytes in the CPU world).

    Creating a context is collective (a host all-reduce of the sizes, symmetric allocations, a barrier): every rank
    creates the same contexts in the same order, and closes them alike. A context serves one stream; calls on it
    need no host sync and allocate nothing (with ``out`` given).

    Example::

        ctx = AllToAllContext(x.numel() * x.element_size())
        for _ in range(steps):
            y = all_to_all(x, ctx=ctx, out=y)
        ctx.close()
    """

    op = "all_to_all"

    def __init__(self, max_bytes: int, dtype: torch.dtype | None = None, *, num_programs: int | None = None,
                 tile_bytes: int | None = None):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"AllToAllContext: max_bytes must be an int >= 0, got {max_bytes!r}")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"AllToAllContext: dtype {dtype} is not supported")
        if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
            raise ValueError(f"AllToAllContext: num_programs must be an int >= 1, got {num_programs!r}")
        if tile_bytes is not None and (not isinstance(tile_bytes, int) or tile_bytes < 8
                                       or tile_bytes & (tile_bytes - 1)):
            raise ValueError(f"AllToAllContext: tile_bytes must be a power of two >= 8, got {tile_bytes!r}")
        # the ranks may pass different sizes (variable splits): the symmetric heap needs the same allocations
        world = triton_dist.current_world()
        agreed = torch.tensor([max_bytes, num_programs or 0, tile_bytes or 0], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=world.group)
        max_bytes, num_programs, tile_bytes = (int(v) for v in agreed)
        num_programs = num_programs or None
        # small tiles in the CPU world, so that even small tensors are spread over the programs
        self.tile_bytes = tile_bytes or (512 if world.interpreted else 16384)
        super().__init__(max(8, -(-max_bytes // 8) * 8), num_programs=num_programs)
        self.max_bytes = max_bytes
        self.dtype = dtype
        w = self.world.world_size
        # row p: (in_offset, in_count) per destination and out_count per source, written by program p, read by the
        # peers' programs p
        self.table = triton_dist.empty((self.num_programs, 3 * w), torch.int64)
        # this rank's [in_offset | in_count | out_offset | out_count] of the current variable-split call
        self.meta = torch.zeros(4 * w, dtype=torch.int64, device=self.world.device)

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank closes its contexts in the same order)."""
        super().close()
        triton_dist.free(self.table)


# ------------------------------------------------------------------------------------------------- helpers
def _row_bytes(x: torch.Tensor) -> int:
    """Bytes of one row (dim 0 indexes the rows)."""
    row_numel = 1
    for s in x.shape[1:]:
        row_numel *= s
    return row_numel * x.element_size()


def _check_x(x: torch.Tensor, what: str, ctx: AllToAllContext | None) -> None:
    check_collective_input(x, what, SUPPORTED_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{what}: x must have at least one dimension (rows along dim 0), got a scalar")
    if ctx is not None:
        if not isinstance(ctx, AllToAllContext):
            raise TypeError(f"{what}: ctx must be an AllToAllContext, got {type(ctx).__name__}")
        if ctx.dtype is not None and x.dtype != ctx.dtype:
            raise ValueError(f"{what}: x is {x.dtype}, the context was made for {ctx.dtype}")
        nbytes = x.numel() * x.element_size()
        if nbytes > ctx.staging_bytes:
            raise ValueError(f"{what}: x has {nbytes} bytes, the context holds at most {ctx.max_bytes}; "
                             f"make a larger AllToAllContext")


def _check_out(out: torch.Tensor, x: torch.Tensor, rows: int, what: str) -> None:
    check_collective_input(out, f"{what} (out)", SUPPORTED_DTYPES)
    if out.dtype != x.dtype:
        raise ValueError(f"{what}: out is {out.dtype}, expected x's dtype {x.dtype}")
    want = (rows,) + tuple(x.shape[1:])
    if tuple(out.shape) != want:
        raise ValueError(f"{what}: out has shape {tuple(out.shape)}, expected {want}")


def _check_splits(splits, name: str, world: int, what: str) -> list[int]:
    if isinstance(splits, torch.Tensor) and splits.dim() == 1 and not splits.is_floating_point():
        splits = splits.tolist()  # a host sync for device tensors: prefer lists
    if not isinstance(splits, (list, tuple)):
        raise TypeError(f"{what}: {name} must be a list of {world} ints, got {type(splits).__name__}")
    if len(splits) != world:
        raise ValueError(f"{what}: {name} must have one entry per rank ({world}), got {len(splits)}: {list(splits)}")
    if any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 0 for s in splits):
        raise ValueError(f"{what}: {name} must hold ints >= 0, got {list(splits)}")
    return [int(s) for s in splits]


def _word(nbytes_row: int, *tensors: torch.Tensor) -> tuple[int, torch.dtype]:
    for size, dtype in _WORDS:
        if nbytes_row % size == 0 and all(t.data_ptr() % size == 0 for t in tensors):
            return size, dtype
    raise AssertionError("uint8 words always fit")


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).view(dtype)


_default: dict = {}


def _default_context(nbytes: int, agree: bool) -> AllToAllContext:
    """The context used when none is passed: grown (to a power of two) when a call needs more staging.

    ``agree``: the ranks may need different sizes (variable splits), so take the maximum over the world first;
    every rank then makes the same decision and the symmetric heap stays symmetric.
    """
    world = triton_dist.current_world()
    if agree:
        t = torch.tensor([nbytes], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.group)
        nbytes = int(t.item())
    ctx = _default.get("ctx")
    if ctx is not None and ctx.world is not world:  # a new world (finalize + init): the old heap is gone
        ctx = None
    if ctx is None or ctx.staging_bytes < nbytes:
        if ctx is not None:
            ctx.close()
        ctx = AllToAllContext(max(1 << 16, triton.next_power_of_2(max(nbytes, 1))))
        _default["ctx"] = ctx
    return ctx


def default_context(nbytes: int) -> AllToAllContext:
    """The module's context (the one :func:`all_to_all` uses without ``ctx``), grown first if it has fewer than
    ``nbytes`` of staging; collective when it grows (every rank asks for the same size). For callers that issue
    several all-to-alls back to back on another stream (``attention.ulysses``' pipelines): grown once up front, it
    is never replaced while an earlier call may still read it."""
    return _default_context(nbytes, agree=False)


def close_default_context() -> None:
    """Free the module-level context that calls without ``ctx`` use (collective, like :meth:`AllToAllContext.close`)."""
    ctx = _default.pop("ctx", None)
    if ctx is not None and ctx.world is triton_dist.current_world():
        ctx.close()


def _launch(ctx: AllToAllContext, x: torch.Tensor, out: torch.Tensor, m_rows: int, equal: bool) -> None:
    row_bytes = _row_bytes(x)
    size, wdtype = _word(row_bytes, x, out)
    x_words = x.numel() * x.element_size() // size
    block = ctx.tile_bytes // size
    staging = ctx.staging[:max(x_words * size, size)].view(wdtype)
    wait_all = ctx.layout_switch("kernel", ctx.num_programs)
    epoch = ctx.call_counters()
    # the word size may differ across ranks (alignment): the signature names rows in bytes; variable splits differ
    # in size by design (their check is the split table's)
    sig = call_signature("all_to_all" if equal else "all_to_all_v", "kernel", x.dtype, x.numel() if equal else 0,
                         row_bytes)
    _all_to_all_kernel[(ctx.num_programs,)](
        _words(x, wdtype), _words(out, wdtype), staging, ctx.table, ctx.meta, ctx.pad, epoch,
        x_words, row_bytes // size, m_rows, ctx.num_programs, wait_all, sig,
        EQUAL=equal, BLOCK=block, WORLD_BLOCK=triton.next_power_of_2(2 * ctx.world.world_size),
        num_warps=8 if not ctx.world.interpreted else 1)


def _launch_copy_engine(ctx: AllToAllContext, x: torch.Tensor, out: torch.Tensor) -> None:
    """Equal splits by DMA (``_common.copy_engine_exchange``): x into my staging, a ready round, then every rank's
    block for me copied out of its staging through its peer view, then done."""
    rank, block = ctx.world.rank, x.numel() * x.element_size() // ctx.world.world_size
    ob = _words(out, torch.uint8)
    copy_engine_exchange(ctx, _words(x, torch.uint8),
                         lambda src, staged: ob[src * block:(src + 1) * block].copy_(
                             staged[rank * block:(rank + 1) * block]),
                         call_signature("all_to_all", "copy_engine", x.dtype, x.numel()))


# ------------------------------------------------------------------------------------------------- public
METHODS = ("kernel", "copy_engine")
COPY_ENGINE_MIN_BYTES = 4 << 20  # auto: copy_engine from here (4x H100, 2026-11-28: kernel won at 1 MiB, CE from 4 MiB)


def all_to_all(x: torch.Tensor, *, ctx: AllToAllContext | None = None, out: torch.Tensor | None = None,
               method: str = "auto") -> torch.Tensor:
    """All-to-all with equal splits: ``torch.distributed.all_to_all_single(out, x)`` without split sizes.

    ``x``: contiguous ``(world * m, ...)`` tensor on this rank's device, the same shape on every rank. Chunk ``j``
    (rows ``[j*m, (j+1)*m)``) goes to rank ``j``; chunk ``i`` of the result came from rank ``i``.
    ``ctx``: an :class:`AllToAllContext` with at least ``x``'s bytes (``None``: a module-level context, made or
    grown on first need, collectively). ``out``: a contiguous tensor of ``x``'s shape and dtype to write into
    (``None``: a new one). Returns ``out``. Collective: every rank calls it, in the same order.
    ``method``: ``"kernel"`` (one Triton kernel: stage, ready, pull; the only method of ``all_to_all_v``),
    ``"copy_engine"`` (DMA copies between three one-program signal kernels) or ``"auto"`` (by size).
    """
    what = "all_to_all"
    if method not in ("auto",) + METHODS:
        raise ValueError(f"{what}: method must be 'auto' or one of {METHODS}, got {method!r}")
    _check_x(x, what, ctx)
    w = triton_dist.current_world().world_size
    if x.shape[0] % w:
        raise ValueError(f"{what}: x has {x.shape[0]} rows, not a multiple of the world size {w}")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, x, x.shape[0], what)
    if ctx is None:
        ctx = _default_context(x.numel() * x.element_size(), agree=False)
    if method == "auto":
        method = "copy_engine" if x.numel() * x.element_size() >= COPY_ENGINE_MIN_BYTES else "kernel"
    if method == "copy_engine" and x.numel():
        _launch_copy_engine(ctx, x, out)
    else:
        _launch(ctx, x, out, x.shape[0] // w, equal=True)
    return out


def all_to_all_v(x: torch.Tensor, input_split_sizes: Sequence[int], output_split_sizes: Sequence[int], *,
                 ctx: AllToAllContext | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """All-to-all with variable splits along dim 0:
    ``torch.distributed.all_to_all_single(out, x, output_split_sizes, input_split_sizes)``.

    ``x``: contiguous ``(sum(input_split_sizes), ...)`` tensor; its ``input_split_sizes[j]`` rows starting at
    ``sum(input_split_sizes[:j])`` go to rank ``j``. The result has ``sum(output_split_sizes)`` rows; from row
    ``sum(output_split_sizes[:i])`` it holds the ``output_split_sizes[i]`` rows rank ``i`` sent here. The split
    sizes are host lists of ``world`` ints >= 0 (zeros allowed) that must agree across ranks, as for torch.
    ``ctx``: an :class:`AllToAllContext` with at least ``x``'s bytes (``None``: a module-level context; finding a
    size every rank agrees on then costs a host all-reduce per call). ``out``: a contiguous
    ``(sum(output_split_sizes), ...)`` tensor of ``x``'s dtype (``None``: a new one). Returns ``out``.
    """
    what = "all_to_all_v"
    _check_x(x, what, ctx)
    w = triton_dist.current_world().world_size
    ins = _check_splits(input_split_sizes, "input_split_sizes", w, what)
    outs = _check_splits(output_split_sizes, "output_split_sizes", w, what)
    if sum(ins) != x.shape[0]:
        raise ValueError(f"{what}: input_split_sizes sum to {sum(ins)}, but x has {x.shape[0]} rows")
    rows = sum(outs)
    if out is None:
        out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    else:
        if out.dim() >= 1 and out.shape[0] != rows:
            raise ValueError(f"{what}: output_split_sizes sum to {rows}, but out has {out.shape[0]} rows")
        _check_out(out, x, rows, what)
    if ctx is None:
        ctx = _default_context(x.numel() * x.element_size(), agree=True)
    meta, acc_in, acc_out = [], 0, 0
    for s in ins:
        meta.append(acc_in)
        acc_in += s
    meta += ins
    for s in outs:
        meta.append(acc_out)
        acc_out += s
    meta += outs
    ctx.meta.copy_(torch.tensor(meta, dtype=torch.int64))  # stream-ordered: the previous call has read it
    _launch(ctx, x, out, 0, equal=False)
    return out


# ---------------------------------------------------------------------------------------------- references
def _bytes_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (rows, row_bytes) uint8 tensor (torch.distributed backends lack some dtypes, e.g. fp8 on gloo)."""
    row_bytes = _row_bytes(t)
    return t.contiguous().reshape(-1).view(torch.uint8).reshape(t.shape[0], row_bytes)


def all_to_all_v_reference(x: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> torch.Tensor:
    """What :func:`all_to_all_v` must return, from ``torch.distributed.all_to_all_single`` (moved as bytes)."""
    world = triton_dist.current_world()
    src = _bytes_rows(x)
    rows = sum(int(s) for s in out_splits)
    got = torch.empty((rows, src.shape[1]), dtype=torch.uint8, device=x.device)
    dist.all_to_all_single(got, src, [int(s) for s in out_splits], [int(s) for s in in_splits], group=world.group)
    return got.view(x.dtype).reshape((rows,) + tuple(x.shape[1:]))


def all_to_all_reference(x: torch.Tensor) -> torch.Tensor:
    """What :func:`all_to_all` must return, from ``torch.distributed.all_to_all_single`` (moved as bytes)."""
    world = triton_dist.current_world()
    src = _bytes_rows(x)
    got = torch.empty_like(src)
    dist.all_to_all_single(got, src, group=world.group)
    return got.view(x.dtype).reshape(x.shape)
