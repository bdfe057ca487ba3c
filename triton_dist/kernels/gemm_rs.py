"""GEMM + ReduceScatter: ``C = reduce_scatter(A @ B)``, the scatter fused into the GEMM's epilogue.

Shards: every rank holds ``a`` (``M x K_loc``, its columns of A) and ``b`` (``K_loc x N``, its rows of B, any
strides). Rank ``r`` gets rows ``r*M/world:(r+1)*M/world`` of ``sum_q a_q @ b_q`` (``M/world x N``): the row-parallel
linear layer of sequence-parallel tensor parallelism. ``M`` must be a multiple of the world size.

Each rank's GEMM computes the output tiles of chunk ``(rank+1) % world`` first and of its own chunk last, and stores
each tile (as a partial in the context's ``partial_dtype``: the input dtype by default, fp32 on request) straight
into slot ``rank`` of the destination rank's symmetric receive buffer (NVLink stores in the epilogue), then raises
that tile's flag on the destination. A reduction kernel sums each finished tile over the slots in rank order (fp32)
into the output.

Signals (int32 on the symmetric heap; ``e`` is the call's epoch, bumped on the stream; every wait is ``>=``):

* ``flags[tile][src]`` on the destination: ``src``'s partial of ``tile`` (of my chunk) is in my slot ``src``; the
  reduction waits for all ``world`` of them (one wait on consecutive signals), then loads;
* ``done[d]`` (``signals[d]``): rank ``d``'s reduction of call ``e`` finished reading its receive buffer. A GEMM
  tile for ``d`` waits ``done[d] >= e-1`` before storing into ``d``'s buffer, so a fast rank cannot overwrite a slot
  a slow peer still reduces. The last reduction program to finish (a local counter) announces ``done``.
* ``headers`` (``2 x world`` int64, ``_common.send_header``): the call's signature (op, method, M, N, partial
  dtype) flagged with its epoch. Program 0 of the GEMM (the copy kernels in ``decomposed``) sends it to every rank
  before any tile; each reduction program checks every sender's (one vector poll) before it waits for a tile, so
  ranks calling differently stop with ``CallMismatch`` instead of waiting for tiles that never come. A parity slot
  is rewritten two calls later, after the sender's tiles of the call between waited for the receiver's ``done``.

Methods:

* ``fused``: the reduction runs on a side stream next to the GEMM (a few programs, waiting per tile);
* ``sequential_reduce``: the reduction runs after the GEMM on the same stream, on all SMs;
* ``decomposed``: one ``torch.matmul`` (cuBLAS) per destination's rows into a local buffer, in the same rotated
  order; after each, a copy stream waits ``done[dst] >= e-1``, copies the partial into slot ``rank`` of ``dst``'s
  receive buffer by DMA (overlapping the next matmul) and raises ``arrived[rank]`` on ``dst``
  (``signals[world+1+src]``); the reduction waits for every peer's ``arrived``, sums the slots (mine from the
  local buffer) and announces ``done``. Partials in the input dtype only;
* ``sequential``: ``torch.matmul`` then :func:`triton_dist.kernels.reduce_scatter.reduce_scatter` (small M).

At world size 1 nothing is reduced: ``fused`` and ``sequential_reduce`` run the GEMM alone on every SM, each tile
stored straight into the output (``DIRECT``: no header, wait or flag), ``decomposed`` and ``sequential`` are
``torch.matmul``.

No program waits for a later launch on its own rank, so both orders run in the CPU world (GEMM, then reduction).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from . import reduce_scatter as _rs
from ._common import (call_signature, check_headers, label_headers, label_words, reduce_slots, send_header,
                      send_headers)
from .gemm import (DTYPES, OverlapContext, announce_done, check_method, check_operands, check_out,
                   chunk_first_tile, dot_precision, grouped_tile, num_sms, operands, store_c, store_operand,
                   tile_dot)

METHODS = ("fused", "sequential_reduce", "decomposed", "sequential")
# auto, from the 4x H100 runs of 2026-11-28 (docs/perf/NOTES.md, bench run 2d40f2306694): "decomposed" (one cuBLAS
# matmul per destination, DMA copies behind the next matmul) won where the per-rank GEMM is large: 1344 us vs
# sequential_reduce 1591 at M=8192 K=7168 N=8192 (M*N*K 4.8e11), a tie at 2.4e11 (824 vs 809 us), far behind below
# (780 vs 277 us at M=1024 K=7168 N=8192). Below that, "sequential_reduce" (our GEMM, scatter in the epilogue, local
# sum) was the best or within 3% of the best everywhere; "fused" lost on every large shape (the spinning reduction
# takes SMs from the GEMM), "sequential" (torch.matmul + our reduce-scatter) was 0.93-0.97x NCCL + cuBLAS at M=1024.
DECOMPOSED_MIN_MNK = 4 * 10**11
AUTO_METHOD = "sequential_reduce"
REDUCE_PROGRAMS = 16  # programs of the reduction next to the GEMM (method "fused") on GPUs
REDUCE_ROWS = 32  # rows of a tile the reduction sums at a time on GPUs (registers)


@triton.jit(do_not_specialize=["call_sig"])
def _gemm_rs_kernel(a, b, recv_ptr, c_desc, flags_ptr, sig_ptr, hdr_ptr, epoch_ptr, m_loc, N, K,
                    stride_am, stride_ak, stride_bk, stride_bn, slot_stride, call_sig,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    DIRECT: tl.constexpr = False, TMA_STORE: tl.constexpr = False):
    """Persistent GEMM, chunk by chunk in the order rank+1, ..., rank: before its first tile for chunk d a program
    waits until d finished reducing the previous call, then runs its tiles of the chunk in one flattened loop; each
    tile goes to slot ``rank`` of rank d's receive buffer (rows relative to the chunk, row stride N), followed by its
    flag. Program 0 first sends the call's header to every rank. ``DIRECT`` (world size 1: nothing to reduce):
    ``recv_ptr`` is the output and the tiles go straight there (through ``c_desc`` with ``TMA_STORE``), with no
    header, wait or flag."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr)
    if not DIRECT:
        if tl.program_id(0) == 0:
            send_headers(hdr_ptr, call_sig, e, rank, world)
    tiles_m = tl.cdiv(m_loc, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_chunk = tiles_m * tiles_n
    for i in range(world):
        dst = (rank + 1 + i) % world
        if DIRECT:
            slot = recv_ptr
        else:
            # dst finished reducing the previous call (waited before the chunk's tiles, while no accumulator is live)
            token = dl.wait(sig_ptr + dst, 1, "sys", "acquire", e - 1, cmp="ge")
            slot = dl.symm_at(dl.consume_token(recv_ptr, token), dst) + rank * slot_stride
        for t in tl.range(chunk_first_tile(i, per_chunk), per_chunk, tl.num_programs(0), flatten=True):
            pid_m, pid_n = grouped_tile(t, tiles_m, tiles_n, GROUP_M)
            acc = tile_dot(a, b, dst * m_loc + pid_m * BLOCK_M, pid_n * BLOCK_N, dst * m_loc + m_loc, N, K,
                           stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, B_TRANS,
                           DOT_PRECISION)
            store_c(slot, c_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, m_loc, N, N, 1, BLOCK_M, BLOCK_N, TMA_STORE)
            if not DIRECT:
                dl.notify(flags_ptr + (pid_m * tiles_n + pid_n) * world + rank, dst, e, "set", "intra_node")


@triton.jit(do_not_specialize=["call_sig"])
def _rs_reduce_kernel(recv_ptr, out_ptr, flags_ptr, sig_ptr, hdr_ptr, epoch_ptr, m_loc, N, slot_stride, call_sig,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SUB_M: tl.constexpr):
    """Sum every tile of my chunk over the ``world`` slots in rank order (fp32) once all of its partials arrived,
    ``SUB_M`` rows at a time (registers), after checking every sender's call header; the last program to finish
    tells every rank that my receive buffer may be overwritten."""
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = tl.load(epoch_ptr)
    check_headers(hdr_ptr, call_sig, e, world)
    tiles_m = tl.cdiv(m_loc, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for t in range(tl.program_id(0), tiles_m * tiles_n, nprog):
        pid_m, pid_n = grouped_tile(t, tiles_m, tiles_n, GROUP_M)  # the producers' order
        token = dl.wait(flags_ptr + (pid_m * tiles_n + pid_n) * world, world, "sys", "acquire", e, cmp="ge")
        base = dl.consume_token(recv_ptr, token)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        for r0 in tl.static_range(0, BLOCK_M, SUB_M):
            rm = pid_m * BLOCK_M + r0 + tl.arange(0, SUB_M)
            offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
            mask = (rm[:, None] < m_loc) & (rn[None, :] < N)
            acc = tl.zeros((SUB_M, BLOCK_N), dtype=tl.float32)
            for src in range(world):
                acc += tl.load(base + src * slot_stride + offs, mask=mask).to(tl.float32)
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    announce_done(sig_ptr, sig_ptr + world, e, nprog)


@triton.jit(do_not_specialize=["call_sig"])
def _dec_signal_kernel(sig_ptr, hdr_ptr, epoch_ptr, dst, call_sig, PHASE: tl.constexpr):
    """Method ``decomposed``, one program on a copy stream. ``PHASE`` 0, before my partial of ``dst``'s rows is
    copied into ``dst``'s receive buffer: ``dst`` finished reducing call e-1 (``done[dst] >= e-1``); then the call's
    header to ``dst``. 1, after the copy: ``arrived[rank] = e`` on ``dst``."""
    e = tl.load(epoch_ptr)
    if PHASE == 0:
        dl.wait(sig_ptr + dst, 1, "sys", "acquire", e - 1, cmp="ge")
        send_header(hdr_ptr, call_sig, e, dl.rank(), dst)
    else:
        dl.notify(sig_ptr + dl.num_ranks() + 1 + dl.rank(), dst, e, "set", "intra_node")


@triton.jit(do_not_specialize=["call_sig"])
def _dec_reduce_kernel(own_ptr, recv_ptr, out_ptr, sig_ptr, hdr_ptr, epoch_ptr, n, slot, call_sig,
                       BLOCK: tl.constexpr):
    """Method ``decomposed``: once every peer's call header checked and its partial of my rows arrived
    (``arrived[src] >= e``), sum the ``world`` partials in rank order (fp32; mine from ``own_ptr``) into ``out``;
    then ``done``."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = tl.load(epoch_ptr)
    if tl.program_id(0) == 0:
        send_header(hdr_ptr, call_sig, e, rank, rank)  # mine: the other programs wait for it (no other launch)
    check_headers(hdr_ptr, call_sig, e, world)
    slots = recv_ptr
    for i in range(1, world):
        src = (rank + i) % world
        slots = dl.consume_token(slots, dl.wait(sig_ptr + world + 1 + src, 1, "sys", "acquire", e, cmp="ge"))
    reduce_slots(own_ptr, slots, slot, n, out_ptr, out_ptr, rank, world, nprog, BLOCK, False)
    announce_done(sig_ptr, sig_ptr + world, e, nprog)


class GemmRSContext(OverlapContext):
    """Receive buffer (``world x ceil(max_m/world) x n`` partials, symmetric), tile flags, signals, epoch and side
    stream of ``gemm_rs`` calls with up to ``max_m`` rows of A, ``k`` columns of A and ``n`` columns of B.

    ``partial_dtype``: dtype of the partial tiles sent over NVLink (default ``dtype``: half the bytes of fp32 for
    bf16; fp32 rounds once instead of twice). ``reduce_programs``: programs of the reduction next to the GEMM
    (default 16 on GPUs, 2 in the CPU world); ``num_programs``: SM budget (default: the GPU's SMs)."""

    op = "gemm_rs"

    def __init__(self, max_m: int, k: int, n: int, dtype: torch.dtype, *, config=None,
                 partial_dtype: torch.dtype | None = None, reduce_programs: int | None = None,
                 num_programs: int | None = None):
        super().__init__(max_m, k, n, dtype, config)
        world = self.world.world_size
        self.partial_dtype = partial_dtype or dtype
        if self.partial_dtype not in DTYPES:
            raise TypeError(f"GemmRSContext: partial_dtype {self.partial_dtype} is not supported")
        self.num_programs = num_programs or num_sms(self.world)
        self.reduce_programs = reduce_programs or (2 if self.world.interpreted else REDUCE_PROGRAMS)
        if not 0 < self.reduce_programs < self.num_programs:
            raise ValueError(f"GemmRSContext: need 0 < reduce_programs < num_programs, got {self.reduce_programs} "
                             f"and {self.num_programs}")
        self.max_m_loc = triton.cdiv(max_m, world)
        cfg = self.config
        max_tiles = triton.cdiv(self.max_m_loc, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        self.recv = self._alloc((world, self.max_m_loc, n), self.partial_dtype)
        self.flags = self._alloc((max_tiles * world,), torch.int32, zero=True)
        # done[world], the reduction's program counter, arrived[world] (method "decomposed")
        self.signals = self._alloc((2 * world + 1,), torch.int32, zero=True)
        self.headers = self._alloc((2 * world,), torch.int64, zero=True)
        label_headers(self.headers, self.op, world)
        label_words(self.flags, self.op, lambda i: (f"flag of tile {i // world} from rank {i % world} (its partial "
                                                     "is in my receive buffer)", i % world))
        label_words(self.signals, self.op, lambda i: (
            (f"done signal of rank {i} (it finished reducing its receive buffer)", i) if i < world else
            ("reduction program counter", None) if i == world else
            (f"arrived signal of rank {i - world - 1} (method decomposed: its partial is in my receive buffer)",
             i - world - 1)))
        self.peer_recv = [triton_dist.peer_view(self.recv, p) for p in range(world)]
        self._send = None
        self._rs_ctx = None
        # method "decomposed" on GPUs: world - 1 copy streams (the DMAs run side by side), one event per chunk
        self.copy_streams = [torch.cuda.Stream(self.world.device) for _ in range(world - 1)] if self.side else []
        self.chunk_events = [torch.cuda.Event() for _ in range(world)] if self.side else []
        self.world.barrier(f"creating a context of {self.op}")  # every rank's signals are zero before anyone raises one

    @contextlib.contextmanager
    def copy_stream(self, i: int, after_chunk: int):
        """Launches inside go to copy stream ``i`` (inside :meth:`forked` only), after the last :meth:`chunk_done`
        of ``after_chunk``; on exit the side stream waits for the copy stream (so :meth:`forked` joins it too). Copy
        streams run side by side: one DMA per peer at a time instead of one after another. CPU world: launches run
        in program order."""
        if self.side is None:
            yield
            return
        st = self.copy_streams[i]
        st.wait_event(self.chunk_events[after_chunk])
        with torch.cuda.stream(st):
            yield
        self.side.wait_stream(st)

    def chunk_done(self, chunk: int) -> None:
        """Record on the current stream that ``chunk`` is done (for :meth:`copy_stream`)."""
        if self.chunk_events:
            self.chunk_events[chunk].record()

    def send_buffer(self) -> torch.Tensor:
        """Local ``world x ceil(max_m/world) x n`` buffer of the partials of method ``decomposed`` (made on its first
        use, outside any CUDA-graph capture)."""
        if self._send is None:
            self._send = torch.empty(self.recv.shape, dtype=self.partial_dtype, device=self.world.device)
        return self._send

    def reduce_scatter_context(self) -> _rs.ReduceScatterContext:
        """The collective's context of method ``sequential``, made on its first use (collective)."""
        if self._rs_ctx is None:
            self._rs_ctx = _rs.ReduceScatterContext(self.world.world_size * self.max_m_loc * self.n, self.dtype)
        return self._rs_ctx

    def close(self) -> None:
        if self._rs_ctx is not None:
            self._rs_ctx.close()
            self._rs_ctx = None
        super().close()


def pick_method(m: int, n: int = 1, k: int = 1, partial_dtype=None, dtype=None) -> str:
    """The automatic choice by the per-rank GEMM size (``m x k @ k x n``); ``decomposed`` only when the partials
    travel in the input dtype."""
    if m * n * k >= DECOMPOSED_MIN_MNK and partial_dtype == dtype:
        return "decomposed"
    return AUTO_METHOD


def gemm_rs(a: torch.Tensor, b: torch.Tensor, *, ctx: GemmRSContext, method: str = "auto",
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rank*M/world:(rank+1)*M/world`` of ``sum over ranks of a @ b`` (fp32 sum); no host sync."""
    check_operands("gemm_rs", a, b)
    check_method("gemm_rs", method, METHODS)
    world = ctx.world.world_size
    m, k = a.shape
    n = b.shape[1]
    if m % world:
        raise ValueError(f"gemm_rs: rows of a ({m}) must be a multiple of the world size {world}")
    ctx.check_call(a, b, m, k, n)
    m_loc = m // world
    out = check_out("gemm_rs", out, (m_loc, n), a.dtype, a.device)
    if m_loc == 0 or n == 0:
        return out
    method = pick_method(m, n, k, ctx.partial_dtype, a.dtype) if method == "auto" else method
    if world == 1 and method in ("sequential", "decomposed"):  # torch.matmul and nothing to reduce (no signal is
        # touched at world size 1, whatever the method)
        return torch.matmul(a, b, out=out)
    if method == "sequential":
        return _rs.reduce_scatter(torch.matmul(a, b), ctx=ctx.reduce_scatter_context(), out=out)
    epoch = ctx.next_epoch() if world > 1 else ctx.epoch  # world size 1: no signal is used, no epoch bump
    slot_stride = ctx.max_m_loc * n
    # K may differ across ranks (each holds its own columns of A); M, N, dtypes and the method may not
    sig = call_signature("gemm_rs", method, a.dtype, m * n, str(ctx.partial_dtype))
    if method == "decomposed":
        if ctx.partial_dtype != a.dtype:
            raise ValueError(f"gemm_rs: method 'decomposed' sends torch.matmul's {a.dtype} partials; this context's "
                             f"partial_dtype is {ctx.partial_dtype} (use 'fused' or 'sequential_reduce')")
        _gemm_rs_decomposed(ctx, a, b, out, m_loc, epoch, sig)
        return out
    cfg = ctx.config
    a_arg, b_arg, use_tma, b_trans = operands(a, b, cfg)
    chunk_tiles = triton.cdiv(m_loc, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    # world size 1: nothing to reduce (methods fused and sequential_reduce alike): every SM computes, each tile stored
    # once into out (TMA stores where its layout allows), no header, wait or flag
    direct = world == 1
    c_desc, tma_store = store_operand(out, cfg, use_tma) if direct else (ctx.recv, False)
    gemm_args = (a_arg, b_arg, out if direct else ctx.recv, c_desc, ctx.flags, ctx.signals, ctx.headers, epoch,
                 m_loc, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), slot_stride, sig)
    gemm_meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                     USE_TMA=use_tma, B_TRANS=b_trans, DOT_PRECISION=dot_precision(a.dtype), DIRECT=direct,
                     TMA_STORE=tma_store, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    reduce_args = (ctx.recv, out, ctx.flags, ctx.signals, ctx.headers, epoch, m_loc, n, slot_stride, sig)
    reduce_meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                       SUB_M=cfg.block_m if ctx.world.interpreted else min(cfg.block_m, REDUCE_ROWS), num_warps=8)
    if direct:
        _gemm_rs_kernel[(min(ctx.num_programs, chunk_tiles),)](*gemm_args, **gemm_meta)
    elif method == "fused":
        with ctx.forked():
            gemm_grid = min(ctx.num_programs - ctx.reduce_programs, world * chunk_tiles)
            _gemm_rs_kernel[(gemm_grid,)](*gemm_args, **gemm_meta)
            with ctx.side_stream():
                _rs_reduce_kernel[(min(ctx.reduce_programs, chunk_tiles),)](*reduce_args, **reduce_meta)
    else:
        _gemm_rs_kernel[(min(ctx.num_programs, world * chunk_tiles),)](*gemm_args, **gemm_meta)
        _rs_reduce_kernel[(min(ctx.num_programs, chunk_tiles),)](*reduce_args, **reduce_meta)
    return out


def _gemm_rs_decomposed(ctx: GemmRSContext, a, b, out, m_loc: int, epoch: torch.Tensor, sig: int) -> None:
    """One torch.matmul per destination's rows (:func:`decomposed_reduce_scatter`)."""
    decomposed_reduce_scatter(ctx, lambda dst, part: torch.matmul(a[dst * m_loc:(dst + 1) * m_loc], b, out=part),
                              out, m_loc, epoch, sig)


def decomposed_reduce_scatter(ctx: GemmRSContext, compute, out: torch.Tensor, m_loc: int, epoch: torch.Tensor,
                              sig: int) -> None:
    """The pipeline of method ``decomposed``, any producer: ``compute(dst, part)`` writes this rank's partial of
    ``dst``'s ``m_loc`` rows into ``part`` ([m_loc, n], the context's ``partial_dtype``), called on the current stream
    for dst = rank+1, ..., rank; each peer's partial is copied into its receive buffer by DMA on a copy stream while
    the next ``compute`` runs; then the reduction into ``out`` ([m_loc, n]). ``epoch``: the call's (bumped)."""
    rank, world = ctx.world.rank, ctx.world.world_size
    send = ctx.send_buffer()
    with ctx.forked():
        for i in range(1, world):
            dst = (rank + i) % world
            compute(dst, send[dst, :m_loc])
            ctx.chunk_done(dst)
            with ctx.copy_stream(i - 1, after_chunk=dst):
                _dec_signal_kernel[(1,)](ctx.signals, ctx.headers, epoch, dst, sig, PHASE=0, num_warps=1)
                ctx.peer_recv[dst][rank, :m_loc].copy_(send[dst, :m_loc])
                _dec_signal_kernel[(1,)](ctx.signals, ctx.headers, epoch, dst, sig, PHASE=1, num_warps=1)
        compute(rank, send[rank, :m_loc])
    block = 1024 if ctx.world.interpreted else 8192
    programs = min(ctx.num_programs, triton.cdiv(m_loc * ctx.n, block))
    _dec_reduce_kernel[(programs,)](send[rank], ctx.recv, out, ctx.signals, ctx.headers, epoch, m_loc * ctx.n,
                                    ctx.max_m_loc * ctx.n, sig, BLOCK=block, num_warps=8)


def gemm_rs_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul, then an fp32 all-reduce (gloo has no reduce_scatter_tensor) and this rank's rows."""
    world = triton_dist.current_world()
    acc = torch.matmul(a, b).to(torch.float32)
    dist.all_reduce(acc, group=world.group)
    m_loc = a.shape[0] // world.world_size
    return acc[world.rank * m_loc:(world.rank + 1) * m_loc].to(a.dtype)
