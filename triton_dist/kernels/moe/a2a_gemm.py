"""All-to-all + GEMM (the reference's ``all_to_all_single_gemm``): ``all_to_all_single(x) @ w``, the GEMM starting
on each source rank's rows as they land.

Shards (``W`` ranks): ``x`` [M_in, K] on every rank, its rows ``in_off[d] .. in_off[d] + in_splits[d]`` for rank
``d`` (``in_splits`` [W], a host list or an int tensor on the device; ``M_in = sum(in_splits)``); every rank gets
``out`` [out_rows, N] = (the rows every rank sent it, source 0's first, each source's in order: what
``torch.distributed.all_to_all_single`` delivers) ``@ w`` (``w`` [K, N], this rank's own). ``out_rows``: the rows it
receives (the sum of its output splits; a bound is fine: rows past the real total are left unwritten).

It is the normal expert-parallel dispatch (:mod:`.ep_normal`) with one "expert" per rank (``topk = 1``, a row's
expert its destination), whose receive copy is replaced by the GEMM itself:

1. on the current stream: the destinations and indices of the rows (torch, on the device), the count table (every
   source's rows per destination, one program), the per-source row offsets at this rank (one program that waits
   for the counts);
2. on a side stream: every row pushed into its destination's packed buffer (NVLink stores), each source raising
   its row flag when done;
3. on the current stream, beside it: the grouped GEMM (:func:`~.tp_moe.launch_moe_gemm`) over the buffer, one group
   per source, every row tile waiting for its source's row flag (the buffer and the flags double-buffered by the
   call's parity, read from the device epoch, so a captured graph replays right); it leaves SMs to the push;
4. after both: one program tells every source that this rank finished reading (the buffer's reuse, two calls on).

No host sync; with ``in_splits`` on the device a call is CUDA-graph capturable. Reference: :func:`a2a_gemm_reference`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels.gemm import OverlapContext
from triton_dist.kernels.moe.ep_low_latency import _signal_every_rank
from triton_dist.kernels.moe.ep_normal import EPNormalContext
from triton_dist.kernels.moe.tp_moe import GemmWait, launch_moe_gemm

COMM_SMS = 16  # SMs the GEMM leaves to the push kernel on GPUs


@triton.jit
def _source_offsets_kernel(cnt_ptr, flag_ptr, epoch_ptr, offs_ptr, BLOCK_W: tl.constexpr):
    """One program: wait for every source's counts, then this rank's row offset per source ([W + 1])."""
    me = dl.rank()
    W = dl.num_ranks()
    e = tl.load(epoch_ptr)
    p = e % 2
    token = dl.wait(flag_ptr + p * W, W, "sys", "acquire", e, cmp="ge")
    offs = tl.arange(0, BLOCK_W)
    c = tl.load(dl.consume_token(cnt_ptr, token) + (p * W + offs) * W + me, mask=offs < W, other=0)
    tl.store(offs_ptr + 1 + offs, tl.cumsum(c, 0), mask=offs < W)
    tl.store(offs_ptr, 0)


@triton.jit
def _release_kernel(done_ptr, epoch_ptr):
    """One program, after the GEMM: this rank no longer reads the buffer of this call (every source's ``done``)."""
    me = dl.rank()
    e = tl.load(epoch_ptr)
    tl.debug_barrier()
    dl.fence("sys", "acq_rel")
    _signal_every_rank(done_ptr + me, e)


class A2AGemmContext(EPNormalContext):
    """Buffers, flags, epoch and side stream of :func:`a2a_gemm` calls with up to ``max_rows_in`` rows of ``k``
    values (``dtype``) sent per rank and up to ``max_rows_out`` received (default ``world * max_rows_in``).
    Collective to make and to close."""

    op = "a2a_gemm"

    def __init__(self, max_rows_in: int, k: int, dtype: torch.dtype = torch.bfloat16, *,
                 max_rows_out: int | None = None):
        world = triton_dist.current_world().world_size
        super().__init__(max_rows_in, k, 1, world, dtype, max_recv_rows=max_rows_out or world * max_rows_in)
        self.side = None
        if not self.world.interpreted:
            self.side = torch.cuda.Stream(self.world.device)
            self._fork, self._join = torch.cuda.Event(), torch.cuda.Event()

    # the overlapped GEMMs' fork / join of the side stream (the attributes they use: world, side, _fork, _join)
    forked = OverlapContext.forked
    side_stream = OverlapContext.side_stream


def _destinations(in_splits, rows: int, world: int, device) -> torch.Tensor:
    """``[rows, 1]`` int32: the destination rank of each row of ``x`` (rows in destination order)."""
    if isinstance(in_splits, torch.Tensor):
        splits = in_splits.to(device=device, dtype=torch.int64)
    else:
        splits = torch.tensor([int(s) for s in in_splits], dtype=torch.int64).to(device)
    dest = torch.repeat_interleave(torch.arange(world, device=device), splits, output_size=rows)
    return dest.to(torch.int32)[:, None]


def a2a_gemm(x: torch.Tensor, w: torch.Tensor, in_splits, out_rows: int, *, ctx: A2AGemmContext) -> torch.Tensor:
    """``all_to_all_single(x, in_splits) @ w`` with the GEMM overlapped (module docstring): ``x`` [M_in, K] of the
    context's dtype (rows in destination order), ``w`` [K, N] (any strides, ``x``'s dtype), ``in_splits`` [W] (host
    list or device int tensor, summing to ``M_in``; checked on the host only for a list), ``out_rows`` the rows this
    rank receives. Returns ``[out_rows, N]``. Collective."""
    what = "a2a_gemm"
    ctx._check_open(what)
    W = ctx.world.world_size
    rows_in = ctx._check_x(what, x)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != ctx.hidden or w.dtype != x.dtype:
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what}: w must be [{ctx.hidden}, N] of x's dtype {x.dtype}, got {got}")
    if not isinstance(in_splits, torch.Tensor):
        splits = list(in_splits)
        if len(splits) != W or any(int(s) < 0 for s in splits) or sum(int(s) for s in splits) != rows_in:
            raise ValueError(f"{what}: in_splits must be {W} counts >= 0 summing to x's {rows_in} rows, got {splits}")
    elif in_splits.numel() != W:
        raise ValueError(f"{what}: in_splits must hold {W} counts, got {in_splits.numel()}")
    if not isinstance(out_rows, int) or isinstance(out_rows, bool) or not 0 <= out_rows <= ctx.max_recv_rows:
        raise ValueError(f"{what}: out_rows must be an int in [0, {ctx.max_recv_rows}] (the context's "
                         f"max_rows_out), got {out_rows!r}")
    n = w.shape[1]
    out = torch.empty((out_rows, n), dtype=x.dtype, device=x.device)
    dest = _destinations(in_splits, rows_in, W, x.device)
    idx = ctx._publish_counts(dest)
    offsets = torch.empty((W + 1,), dtype=torch.int32, device=x.device)
    _source_offsets_kernel[(1,)](ctx.n_cnt, ctx.n_flag1, ctx.epoch, offsets, BLOCK_W=triton.next_power_of_2(W),
                                 num_warps=1)
    R = ctx.max_recv_rows
    budget = None if ctx.world.interpreted else max(1, ctx.world.num_sms - COMM_SMS)
    wait = GemmWait(ctx.n_flag2, ctx.epoch, budget, 0, x_par=R * ctx.hidden, sig_par=W)
    with ctx.forked():
        with ctx.side_stream():
            ctx._send(x, dest, idx)
        if out_rows and n:
            launch_moe_gemm(ctx.n_buf.view(2 * R, ctx.hidden), w.unsqueeze(0), out, offsets, None, W, out_rows,
                            False, wait)
    _release_kernel[(1,)](ctx.n_done, ctx.epoch, num_warps=1)
    return out


def a2a_gemm_reference(x: torch.Tensor, w: torch.Tensor, in_splits, out_splits) -> torch.Tensor:
    """``torch.distributed.all_to_all_single`` (host split lists), then ``torch.matmul`` in fp32."""
    world = triton_dist.current_world()
    recv = torch.empty((sum(out_splits), x.shape[1]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv, x.contiguous(), list(out_splits), list(in_splits), group=world.group)
    return recv.float() @ w.float()
