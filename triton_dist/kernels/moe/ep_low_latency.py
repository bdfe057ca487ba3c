"""Expert-parallel dispatch and combine, the low-latency kind (decode): DeepEP's low-latency semantics on our
primitives, fixed buffers, no host sync, CUDA-graph capturable.

Ranks and experts (``W`` ranks, ``E`` experts, ``L = E / W`` local experts, rank ``r`` owns experts ``r * L ..
r * L + L - 1``). Every rank holds up to ``M`` (``max_tokens``) tokens ``x`` [T, H] and their routing ``topk_ids``
[T, K] (global expert ids; ``-1``: the slot sends nothing; so does an id out of ``[0, E)``, which is an error
reported on the host for CPU tensors and, on GPUs, where checking would sync, an ignored slot, never a fault; a
token's experts must be distinct, as a top-k's are: checked likewise, memory-safe but undefined on GPUs). A
*pair* ``(t, j)`` is token ``t``'s copy for expert ``topk_ids[t, j]``; its *index* ``i`` is the number of this
rank's earlier pairs (in ``t * K + j`` order) for the same expert, so a sender numbers its pairs without talking to
anyone.

* :meth:`EPLowLatencyContext.dispatch` ``(x, topk_ids) -> (recv_x, recv_count, handle)``: ``recv_x`` [L, W * M, H]
  holds, for local expert ``l``, first the rows rank 0 sent it (in index order), then rank 1's, ...: rows
  ``0 .. recv_count[l]`` are real, the rest unwritten. With ``fp8=True`` (context option) the rows travel and
  arrive as e4m3 with one fp32 scale per 128 values (``recv_x`` a pair ``(values [L, W*M, H] fp8, scales [L, W*M,
  H/128] fp32)``): ``scale = max(amax, 1e-4) / 448``, ``value = x * (448 / max(amax, 1e-4))`` (DeepEP's
  ``per_token_cast_to_fp8``), computed at the sender.
* :meth:`EPLowLatencyContext.combine` ``(y, topk_ids, topk_weights, handle) -> out`` [T, H]: ``y`` [L, W * M, H] is
  the experts' output in ``recv_x``'s row order; row ``(l, k)`` goes back to the rank and pair it came from, and the
  source rank sums ``out[t] = sum_j topk_weights[t, j] * y_row(t, j)`` over its valid slots in ``j`` order in fp32
  (deterministic; FMA contraction off, so a torch loop in the same order gives the same bits).

Buffers (symmetric, two of each by call parity, so call ``e + 1`` never writes where call ``e`` is still read):

=========================  ==============================  ========================================================
``d_buf [2, L, W, M, H]``  at the expert's rank            pair ``(t, j)`` of rank ``s`` for local expert ``l`` at
                                                           ``[parity, l, s, i]`` (+ ``d_scale`` with fp8)
``d_src [2, L, W, M]``     at the expert's rank            ``t * K + j`` of that pair (the combine's return address)
``d_cnt [2, W, L]``        at the expert's rank            pairs rank ``s`` sent to each local expert
``d_flag [2, W]``          at the expert's rank            epoch: rank ``s``'s rows and counts of the call are here
``d_done [W]``             at the sender                   epoch: rank ``r`` finished reading what I sent it
``c_buf [2, M * K, H]``    at the token's rank             the expert output of pair ``t * K + j``
``c_flag [2, W]``          at the token's rank             epoch: rank ``r`` sent every row it holds of mine
``c_done [W]``             at the expert's rank            epoch: rank ``s`` finished reading its ``c_buf``
=========================  ==============================  ========================================================

Protocol, call ``e`` (parity ``p = e % 2``; each op has its own device epoch counter, bumped by the last program of
its send kernel: no host op per call). Every step is one kernel; no program waits for a program of its own rank, so
the CPU world's one-program-at-a-time interpreter makes progress.

1. dispatch send (one program per token and ``BLOCK_H`` values of its row): wait ``d_done[*] >= e - 2`` (the
   receivers are done with parity ``p``); number my pairs; store each pair's row (and scales) and return address
   into the expert rank's ``d_buf``, tallying the pairs per expert (atomics on a local array); count myself on an
   arrival counter. The last program to arrive stores the tally into every rank's ``d_cnt[p, me]`` (and resets
   it), then (one fence, relaxed stores) sets ``d_flag[p, me] = e`` on every rank.
2. dispatch receive (one program per (local expert, source)): wait ``d_flag[p, *] >= e``; offset = the counts of the
   sources before mine for this expert; copy the rows into ``recv_x``, the return addresses into the handle. The
   last program sets ``d_done[me] = e`` on every rank.
3. combine send (one program per (local expert, source)): wait ``c_done[*] >= e - 2``; store each row of ``y``
   into its source rank's ``c_buf[p, t * K + j]``; the last program sets ``c_flag[p, me] = e`` on every rank.
4. combine receive (one program per token and ``BLOCK_H`` values): wait ``c_flag[p, *] >= e``; the weighted sum;
   the last program sets ``c_done[me] = e`` on every rank.

A rank that sends nothing (``T = 0``, or every id ``-1``) still sets its flags, and an expert that receives nothing
gets ``recv_count`` 0. Waits are the watchdog's (``TRITON_DIST_WAIT_TIMEOUT_S``): a missing peer is reported with the
flag's name (which step, which rank). The context is made once per (max tokens, hidden, top-k, experts, dtype,
fp8); every rank makes the same contexts in the same order (symmetric allocations).

References: :func:`dispatch_reference` and :func:`combine_reference` (torch, all ranks' inputs gathered with
torch.distributed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels._common import free_symmetric, label_words
from triton_dist.kernels._common import last_to_arrive as _arrive

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn
FP8_GROUP = 128  # values per fp32 scale
FP8_MAX = 448.0  # e4m3's largest finite value
FP8_AMAX_FLOOR = 1e-4  # an all-zero group gets this amax (DeepEP's clamp), so its scale is never 0


# ---------------------------------------------------------------------------------------------- device side
@triton.jit
def _signal_every_rank(flag_ptr, value):
    """Set ``flag_ptr`` (a symmetric int32) to ``value`` on every rank: one fence (in :func:`_arrive`), then relaxed
    stores."""
    for r in range(dl.num_ranks()):
        dl.notify(flag_ptr, r, value, "set", "intra_node", semantic="relaxed")


@triton.jit
def _pick(vec, offs, j):
    """Element ``j`` of a small vector, as a scalar."""
    return tl.sum(tl.where(offs == j, vec, tl.zeros_like(vec)), axis=0)


@triton.jit
def _dispatch_send_kernel(x_ptr, ids_ptr, buf_ptr, scale_ptr, src_ptr, cnt_ptr, flag_ptr, done_ptr, epoch_ptr,
                          arrive_ptr, tally_ptr, T, H, stride_x, L, M, HC,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_E: tl.constexpr, FP8: tl.constexpr):
    """Program ``t * HC + c``: values ``c * BLOCK_H ..`` of token ``t``'s row, stored for each of its pairs
    (programs past ``T`` only arrive). Step 1 of the module docstring."""
    me = dl.rank()
    W = dl.num_ranks()
    pid = tl.program_id(0)
    t = pid // HC
    c = pid % HC
    e = tl.load(epoch_ptr) + 1
    p = e % 2
    token = dl.wait(done_ptr, W, "sys", "acquire", e - 2, cmp="ge")
    buf = dl.consume_token(buf_ptr, token)  # every store into the receivers' buffers stays after the wait
    scale_ptr = dl.consume_token(scale_ptr, token)
    src_ptr = dl.consume_token(src_ptr, token)
    offs_k = tl.arange(0, BLOCK_K)
    if t < T:
        my = tl.load(ids_ptr + t * K + offs_k, mask=offs_k < K, other=-1)
        # index of each pair: this rank's earlier pairs for the same expert (earlier tokens, then earlier slots)
        idx = tl.zeros([BLOCK_K], dtype=tl.int32)
        for t0 in range(0, t, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            prev = tl.load(ids_ptr + rows[:, None] * K + offs_k[None, :],
                           mask=(rows[:, None] < t) & (offs_k[None, :] < K), other=-1)
            same = (prev[:, :, None] == my[None, None, :]).to(tl.int32)  # [BLOCK_T, BLOCK_K, BLOCK_K]
            idx += tl.sum(tl.sum(same, axis=0), axis=0)
        earlier = (my[:, None] == my[None, :]) & (offs_k[:, None] < offs_k[None, :])
        idx += tl.sum(earlier.to(tl.int32), axis=0)
        offs_h = c * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = offs_h < H
        xv = tl.load(x_ptr + t.to(tl.int64) * stride_x + offs_h, mask=hm, other=0.0)  # once for the K stores
        if FP8:
            xg = tl.reshape(xv.to(tl.float32), [BLOCK_H // 128, 128])
            amax = tl.maximum(tl.max(tl.abs(xg), axis=1), 1e-4)
            # IEEE divisions (div_rn): what torch computes for tensor / tensor, bit for bit
            inv = tl.math.div_rn(tl.full([BLOCK_H // 128], 448.0, tl.float32), amax)
            xv = tl.reshape(xg * inv[:, None], [BLOCK_H]).to(buf.dtype.element_ty)
            scale = tl.math.div_rn(amax, tl.full([BLOCK_H // 128], 448.0, tl.float32))
            offs_g = c * (BLOCK_H // 128) + tl.arange(0, BLOCK_H // 128)
        for j in tl.static_range(K):
            ej = _pick(my, offs_k, j)
            ij = _pick(idx, offs_k, j)
            # an id out of range, or a pair past M for its expert (a token naming an expert twice), sends nothing:
            # never a write out of bounds
            if (ej >= 0) & (ej < L * W) & (ij < M):
                r = ej // L
                row = (((p * L + ej % L) * W + me) * M + ij).to(tl.int64)
                tl.store(dl.symm_at(buf + row * H + offs_h, r), xv, mask=hm)
                if FP8:
                    tl.store(dl.symm_at(scale_ptr + row * (H // 128) + offs_g, r), scale, mask=offs_g < H // 128)
                if c == 0:
                    tl.store(dl.symm_at(src_ptr + row, r), t * K + j)
                    dl.atomic_add(tally_ptr + ej, 1, "gpu", "relaxed")  # pairs sent per expert (order-free)
    if _arrive(arrive_ptr):
        # the last program: the pairs sent per expert (the tally), stored into every rank's counts, the tally reset
        # for the next call; then every rank's flag
        for r in range(W):
            for l0 in range(0, L, BLOCK_E):
                offs_l = l0 + tl.arange(0, BLOCK_E)
                lm = offs_l < L
                cnt = tl.load(tally_ptr + r * L + offs_l, mask=lm, other=0)
                tl.store(dl.symm_at(cnt_ptr + (p * W + me) * L + offs_l, r), cnt, mask=lm)
                tl.store(tally_ptr + r * L + offs_l, tl.zeros_like(cnt), mask=lm)
        tl.debug_barrier()
        dl.fence("sys", "acq_rel")
        _signal_every_rank(flag_ptr + p * W + me, e)
        tl.store(epoch_ptr, e)


@triton.jit
def _dispatch_recv_kernel(buf_ptr, scale_ptr, src_ptr, cnt_ptr, flag_ptr, done_ptr, epoch_ptr, arrive_ptr,
                          out_ptr, out_scale_ptr, out_slot_ptr, out_rank_ptr, layout_ptr, count_ptr, H, L, M,
                          BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_G: tl.constexpr, FP8: tl.constexpr):
    """Program ``l * W + s``: the rows source ``s`` sent local expert ``l``. Step 2 of the module docstring."""
    me = dl.rank()
    W = dl.num_ranks()
    pid = tl.program_id(0)
    le = pid // W
    src = pid % W
    e = tl.load(epoch_ptr)
    p = e % 2
    token = dl.wait(flag_ptr + p * W, W, "sys", "acquire", e, cmp="ge")
    offs_w = tl.arange(0, BLOCK_W)
    cnts = tl.load(dl.consume_token(cnt_ptr, token) + (p * W + offs_w) * L + le, mask=offs_w < W, other=0)
    n = _pick(cnts, offs_w, src)
    off = tl.sum(tl.where(offs_w < src, cnts, tl.zeros_like(cnts)), axis=0)
    buf = dl.consume_token(buf_ptr, token)
    srcs = dl.consume_token(src_ptr, token)
    base_in = ((p * L + le) * W + src).to(tl.int64) * M  # row of index 0 in d_buf
    base_out = le.to(tl.int64) * W * M + off  # row of index 0 in recv_x
    for i0 in range(0, n, BLOCK_R):
        rows = i0 + tl.arange(0, BLOCK_R)
        rm = rows < n
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            m2 = rm[:, None] & (offs_h < H)[None, :]
            v = tl.load(buf + (base_in + rows)[:, None] * H + offs_h[None, :], mask=m2)
            tl.store(out_ptr + (base_out + rows)[:, None] * H + offs_h[None, :], v, mask=m2)
        if FP8:
            sc = dl.consume_token(scale_ptr, token)
            offs_g = tl.arange(0, BLOCK_G)
            mg = rm[:, None] & (offs_g < H // 128)[None, :]
            s = tl.load(sc + (base_in + rows)[:, None] * (H // 128) + offs_g[None, :], mask=mg)
            tl.store(out_scale_ptr + (base_out + rows)[:, None] * (H // 128) + offs_g[None, :], s, mask=mg)
        tl.store(out_slot_ptr + base_out + rows, tl.load(srcs + base_in + rows, mask=rm), mask=rm)
        tl.store(out_rank_ptr + base_out + rows, tl.zeros([BLOCK_R], dtype=tl.int32) + src, mask=rm)
    tl.store(layout_ptr + (le * W + src) * 2, off)
    tl.store(layout_ptr + (le * W + src) * 2 + 1, n)
    if src == W - 1:
        tl.store(count_ptr + le, off + n)
    if _arrive(arrive_ptr):
        _signal_every_rank(done_ptr + me, e)


@triton.jit
def _combine_send_kernel(y_ptr, stride_yl, stride_yr, slot_ptr, layout_ptr, cbuf_ptr, cflag_ptr, cdone_ptr,
                         epoch_ptr, arrive_ptr, H, MK, CAP,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``l * W + s``: the rows of local expert ``l`` that came from rank ``s`` (``layout[l, s]``: first row,
    rows), back to ``s``'s ``c_buf`` at their return addresses, ``BLOCK_R`` rows at a time. Step 3."""
    me = dl.rank()
    W = dl.num_ranks()
    pid = tl.program_id(0)
    le = pid // W
    s = pid % W
    e = tl.load(epoch_ptr) + 1
    p = e % 2
    token = dl.wait(cdone_ptr, W, "sys", "acquire", e - 2, cmp="ge")
    cbuf = dl.consume_token(cbuf_ptr, token)
    off = tl.load(layout_ptr + (le * W + s) * 2)
    n = tl.load(layout_ptr + (le * W + s) * 2 + 1)
    for i0 in range(0, n, BLOCK_R):
        rows = off + i0 + tl.arange(0, BLOCK_R)
        rm = rows < off + n
        q = tl.load(slot_ptr + le * CAP + rows, mask=rm, other=0)
        dst_rows = (p * MK + q).to(tl.int64) * H
        src_rows = le.to(tl.int64) * stride_yl + rows.to(tl.int64) * stride_yr
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            m2 = rm[:, None] & (offs_h < H)[None, :]
            v = tl.load(y_ptr + src_rows[:, None] + offs_h[None, :], mask=m2)
            tl.store(dl.symm_at(cbuf + dst_rows[:, None] + offs_h[None, :], s), v, mask=m2)
    if _arrive(arrive_ptr):
        _signal_every_rank(cflag_ptr + p * W + me, e)
        tl.store(epoch_ptr, e)


@triton.jit
def _combine_recv_kernel(ids_ptr, w_ptr, cbuf_ptr, cflag_ptr, cdone_ptr, epoch_ptr, arrive_ptr, out_ptr, T, H, MK, E,
                         HC,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``t * HC + hc``: values ``hc * BLOCK_H ..`` of ``out[t] = sum_j w[t, j] * c_buf[p, t * K + j]`` over
    the valid slots, in ``j`` order, fp32. Step 4."""
    me = dl.rank()
    W = dl.num_ranks()
    t = tl.program_id(0) // HC
    hc = tl.program_id(0) % HC
    e = tl.load(epoch_ptr)
    p = e % 2
    token = dl.wait(cflag_ptr + p * W, W, "sys", "acquire", e, cmp="ge")
    cbuf = dl.consume_token(cbuf_ptr, token)
    if t < T:
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + t * K + offs_k, mask=offs_k < K, other=-1)
        ws = tl.load(w_ptr + t * K + offs_k, mask=offs_k < K, other=0.0)
        offs_h = hc * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = offs_h < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            ej = _pick(ids, offs_k, j)
            if (ej >= 0) & (ej < E):  # the slots the dispatch sent
                row = (p * MK + t * K + j).to(tl.int64)
                v = tl.load(cbuf + row * H + offs_h, mask=hm, other=0.0).to(tl.float32)
                acc = acc + _pick(ws, offs_k, j) * v
        tl.store(out_ptr + t.to(tl.int64) * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=hm)
    if _arrive(arrive_ptr):
        _signal_every_rank(cdone_ptr + me, e)


# ---------------------------------------------------------------------------------------------- host side
@dataclass
class DispatchHandle:
    """What :meth:`EPLowLatencyContext.combine` needs of a dispatch: per received row (``[L, W * M]``, rows
    ``0 .. recv_count[l]`` valid) its source rank and the source's pair ``t * K + j``; ``layout`` [L, W, 2] int32:
    (first row, rows) of each source in each local expert's rows; the call's token count and top-k."""

    recv_count: torch.Tensor
    src_rank: torch.Tensor
    src_slot: torch.Tensor
    layout: torch.Tensor
    num_tokens: int
    topk: int


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class _EPContext:
    """What every expert-parallel context shares: the argument checks, the combine's buffers (``c_buf``, ``c_flag``,
    ``c_done``, its epoch and arrival counters) and :meth:`combine`; a subclass adds its dispatch's buffers and says
    how its rows are laid out (:meth:`_combine_rows`)."""

    op = "ep"

    def __init__(self, max_tokens: int, hidden: int, topk: int, num_experts: int, dtype: torch.dtype):
        what = type(self).__name__
        self.world = triton_dist.current_world()
        w = self.world.world_size
        for name, v in (("max_tokens", max_tokens), ("hidden", hidden), ("topk", topk), ("num_experts", num_experts)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{what}: {name} must be an int >= 1, got {v!r}")
        if num_experts % w:
            raise ValueError(f"{what}: num_experts = {num_experts} must be a multiple of the world size {w} (each "
                             "rank owns num_experts / world experts)")
        if topk > num_experts:
            raise ValueError(f"{what}: topk = {topk} is more than num_experts = {num_experts}")
        if dtype not in DTYPES:
            raise TypeError(f"{what}: dtype must be one of bf16, fp16, fp32, got {dtype}")
        self.max_tokens, self.hidden, self.topk, self.num_experts = max_tokens, hidden, topk, num_experts
        self.dtype, self.fp8 = dtype, False
        self.local_experts = num_experts // w
        i32 = torch.int32
        self.c_buf = triton_dist.empty((2, max_tokens * topk, hidden), dtype)
        self.c_flag = triton_dist.zeros((2, w), i32)
        self.c_done = triton_dist.zeros((w,), i32)
        dev = self.world.device
        self.c_epoch = torch.zeros(1, dtype=i32, device=dev)
        self.c_arrivals = torch.zeros(2, dtype=i32, device=dev)
        self._symmetric = [self.c_buf, self.c_flag, self.c_done]
        label_words(self.c_flag, self.op, lambda i: (f"combine flag (parity {i // w}) of rank {i % w}: the expert "
                                                     "outputs it holds of this rank's tokens", i % w))
        label_words(self.c_done, self.op, lambda i: (f"combine done flag of rank {i}: it finished reading the "
                                                     "outputs this rank sent it two calls ago", i))
        self._closed = False

    def _ready(self) -> None:
        """The end of a subclass's ``__init__``: every rank's flags are zero before any rank signals into them."""
        self.world.barrier(f"creating a context of {self.op}")

    def _combine_rows(self, handle) -> tuple[tuple, bool, int]:
        """``(y's shape, whether y has a local-expert dimension, rows per local expert in the handle's row numbering
        (0: rows numbered across experts))`` for :meth:`combine`."""
        raise NotImplementedError

    def combine(self, y: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: "DispatchHandle",
                *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Send the experts' outputs back and sum them at the source with the routing weights (module docstring).
        ``y``: the experts' output in the dispatch's row order (``recv_x``'s shape; rows past the counts ignored; unit
        stride along H), of the context's dtype; ``topk_ids`` / ``topk_weights`` [T, K] of this rank's dispatch
        (weights: any float dtype, summed in fp32); ``handle`` from that dispatch. Returns ``out`` [T, H] (the
        context's dtype). Collective."""
        what = f"{self.op}.combine"
        self._check_open(what)
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{what}: handle must be the DispatchHandle of the matching dispatch, got "
                            f"{type(handle).__name__}")
        W, L, M, H, K = self.world.world_size, self.local_experts, self.max_tokens, self.hidden, self.topk
        shape, per_expert, cap = self._combine_rows(handle)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != shape or y.dtype != self.dtype:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{what}: y must be the experts' output {list(shape)} {self.dtype} (recv_x's rows), "
                             f"got {got}")
        if y.stride(-1) != 1:
            raise ValueError(f"{what}: y must have a unit stride along hidden, got strides {y.stride()}")
        self._check_device(what, "y", y)
        T = handle.num_tokens
        ids = self._check_ids(what, topk_ids, T)
        if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != (T, K) or \
                not topk_weights.dtype.is_floating_point:
            got = f"{tuple(topk_weights.shape)} {topk_weights.dtype}" if isinstance(topk_weights, torch.Tensor) \
                else type(topk_weights).__name__
            raise ValueError(f"{what}: topk_weights must be a float [{T}, {K}] tensor, got {got}")
        self._check_device(what, "topk_weights", topk_weights)
        weights = topk_weights.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty((T, H), dtype=self.dtype, device=y.device)
        elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, H) or out.dtype != self.dtype or \
                not out.is_contiguous():
            raise ValueError(f"{what}: out must be a contiguous ({T}, {H}) {self.dtype} tensor")
        interp = self.world.interpreted
        block_h = min(_pow2(H), 256 if interp else 1024)
        _combine_send_kernel[(L * W,)](
            y, y.stride(0) if per_expert else 0, y.stride(-2), handle.src_slot, handle.layout, self.c_buf,
            self.c_flag, self.c_done, self.c_epoch, self.c_arrivals, H, M * K, cap, BLOCK_R=4 if interp else 8,
            BLOCK_H=block_h, num_warps=4)
        hc = triton.cdiv(H, block_h)
        _combine_recv_kernel[(max(T, 1) * hc,)](
            ids, weights, self.c_buf, self.c_flag, self.c_done, self.c_epoch, self.c_arrivals[1:], out, T, H, M * K,
            self.num_experts, hc, K=K, BLOCK_K=_pow2(K), BLOCK_H=block_h, num_warps=4, enable_fp_fusion=False)
        return out

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank closes its contexts in the same order)."""
        if self._closed:
            return
        free_symmetric(self.world, self.op, self._symmetric)
        self._closed = True

    def _check_ids(self, what: str, topk_ids: torch.Tensor, tokens: int) -> torch.Tensor:
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32,
                                                                                                  torch.int64):
            got = f"{tuple(topk_ids.shape)} {topk_ids.dtype}" if isinstance(topk_ids, torch.Tensor) else \
                type(topk_ids).__name__
            raise TypeError(f"{what}: topk_ids must be a [T, {self.topk}] int32 or int64 tensor, got {got}")
        if tuple(topk_ids.shape) != (tokens, self.topk):
            raise ValueError(f"{what}: topk_ids is {tuple(topk_ids.shape)}, expected ({tokens}, {self.topk}) "
                             f"(x's tokens, the context's top-k)")
        self._check_device(what, "topk_ids", topk_ids)
        if topk_ids.device.type == "cpu" and topk_ids.numel():  # no sync there: check the ids
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"{what}: topk_ids must be in [-1, {self.num_experts}) (-1: no expert), got "
                                 f"values in [{lo}, {hi}]")
            srt = topk_ids.sort(dim=1).values
            if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
                raise ValueError(f"{what}: a token names an expert twice in topk_ids; a token's experts must be "
                                 "distinct (a top-k)")
        return topk_ids.to(torch.int32).contiguous()

    def _check_device(self, what: str, name: str, t: torch.Tensor) -> None:
        dev = self.world.device
        if t.device.type != dev.type or (dev.type == "cuda" and t.device.index != dev.index):
            raise ValueError(f"{what}: {name} is on {t.device}, expected this rank's device {dev}")

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the context was closed")

    def _check_x(self, what: str, x: torch.Tensor) -> int:
        """``x`` [T, H] of the context's dtype with unit-stride rows, ``T <= max_tokens``, on this rank: returns T."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = f"{x.dim()} dims" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{what}: x must be a [T, hidden] tensor, got {got}")
        if x.dtype != self.dtype or x.shape[1] != self.hidden:
            raise ValueError(f"{what}: the context is for [T, {self.hidden}] {self.dtype} rows, got "
                             f"{tuple(x.shape)} {x.dtype}")
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"{what}: {x.shape[0]} tokens, the context holds at most max_tokens = "
                             f"{self.max_tokens}")
        if x.stride(1) != 1:
            raise ValueError(f"{what}: x must have contiguous rows (unit stride along hidden), got strides "
                             f"{x.stride()}")
        self._check_device(what, "x", x)
        return x.shape[0]


class EPLowLatencyContext(_EPContext):
    """Buffers and epoch counters of low-latency dispatch / combine for up to ``max_tokens`` tokens per rank of
    ``hidden`` values (``dtype``: bf16, fp16 or fp32), ``topk`` experts per token out of ``num_experts`` (a multiple
    of the world size). ``fp8``: dispatch sends e4m3 values with fp32 scales per 128 (``hidden % 128 == 0``); the
    combine always moves ``dtype``. Collective to make and to :meth:`close` (symmetric allocations): every rank makes
    the same contexts in the same order. Symmetric memory per rank: about ``2 * E/W * W * M * H`` elements for the
    dispatch and ``2 * M * K * H`` for the combine."""

    op = "ep_low_latency"

    def __init__(self, max_tokens: int, hidden: int, topk: int, num_experts: int, dtype: torch.dtype = torch.bfloat16,
                 *, fp8: bool = False):
        what = type(self).__name__
        if not isinstance(fp8, bool):
            raise TypeError(f"{what}: fp8 must be a bool, got {fp8!r}")
        if fp8 and isinstance(hidden, int) and hidden % FP8_GROUP:
            raise ValueError(f"{what}: fp8 dispatch needs hidden % {FP8_GROUP} == 0 (one scale per {FP8_GROUP} "
                             f"values), got hidden = {hidden}")
        super().__init__(max_tokens, hidden, topk, num_experts, dtype)
        self.fp8 = fp8
        w = self.world.world_size
        L, M, H = self.local_experts, max_tokens, hidden
        i32 = torch.int32
        self.d_buf = triton_dist.empty((2, L, w, M, H), FP8 if fp8 else dtype)
        self.d_scale = triton_dist.empty((2, L, w, M, H // FP8_GROUP) if fp8 else (1,), torch.float32)
        self.d_src = triton_dist.empty((2, L, w, M), i32)
        self.d_cnt = triton_dist.zeros((2, w, L), i32)
        self.d_flag = triton_dist.zeros((2, w), i32)
        self.d_done = triton_dist.zeros((w,), i32)
        self._symmetric += [self.d_buf, self.d_scale, self.d_src, self.d_cnt, self.d_flag, self.d_done]
        dev = self.world.device
        self.epochs = torch.zeros(1, dtype=i32, device=dev)  # the dispatch's
        self.arrivals = torch.zeros(2, dtype=i32, device=dev)  # one counter per dispatch kernel
        self.tally = torch.zeros(num_experts, dtype=i32, device=dev)  # pairs sent per expert in a dispatch
        op = self.op
        label_words(self.d_flag, op, lambda i: (f"dispatch flag (parity {i // w}) of rank {i % w}: its rows and "
                                                "counts", i % w))
        label_words(self.d_done, op, lambda i: (f"dispatch done flag of rank {i}: it finished reading what this "
                                                "rank sent it two calls ago", i))
        self._ready()

    def _combine_rows(self, handle) -> tuple[tuple, bool, int]:
        cap = self.capacity
        return (self.local_experts, cap, self.hidden), True, cap

    @property
    def capacity(self) -> int:
        """Rows per local expert in ``recv_x``: ``world * max_tokens``."""
        return self.world.world_size * self.max_tokens

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor):
        """Send each token's row to its top-k experts' ranks (module docstring). ``x`` [T, H] of the context's dtype,
        ``T <= max_tokens`` (0 allowed), contiguous rows; ``topk_ids`` [T, K] int32 / int64 in ``[-1, E)``
        (checked on the host only for CPU tensors). Returns ``(recv_x, recv_count, handle)``: ``recv_x`` [L, W * M,
        H] (or ``(values, scales)`` with fp8), ``recv_count`` [L] int32, ``handle`` for :meth:`combine`. Collective
        (every rank calls it, each with its own tokens); no host sync."""
        what = f"{self.op}.dispatch"
        self._check_open(what)
        T = self._check_x(what, x)
        ids = self._check_ids(what, topk_ids, T)
        W, L, M, H, K = self.world.world_size, self.local_experts, self.max_tokens, self.hidden, self.topk
        dev = x.device
        cap = W * M
        recv_x = torch.empty((L, cap, H), dtype=FP8 if self.fp8 else self.dtype, device=dev)
        recv_scale = torch.empty((L, cap, H // FP8_GROUP) if self.fp8 else (1,), dtype=torch.float32, device=dev)
        src_slot = torch.empty((L, cap), dtype=torch.int32, device=dev)
        src_rank = torch.empty((L, cap), dtype=torch.int32, device=dev)
        layout = torch.empty((L, W, 2), dtype=torch.int32, device=dev)
        count = torch.empty((L,), dtype=torch.int32, device=dev)
        interp = self.world.interpreted
        block_h = min(_pow2(H), 256 if interp else 1024)
        if self.fp8:
            block_h = max(block_h, FP8_GROUP)
        hc = triton.cdiv(H, block_h)  # programs per token: one per BLOCK_H values (bytes in flight)
        _dispatch_send_kernel[(max(T, 1) * hc,)](
            x, ids, self.d_buf, self.d_scale, self.d_src, self.d_cnt, self.d_flag, self.d_done, self.epochs,
            self.arrivals, self.tally, T, H, x.stride(0), L, M, hc,
            K=K, BLOCK_K=_pow2(K), BLOCK_T=min(_pow2(T), 32), BLOCK_H=block_h, BLOCK_E=min(_pow2(L), 64),
            FP8=self.fp8, num_warps=4)
        _dispatch_recv_kernel[(L * W,)](
            self.d_buf, self.d_scale, self.d_src, self.d_cnt, self.d_flag, self.d_done, self.epochs,
            self.arrivals[1:], recv_x, recv_scale, src_slot, src_rank, layout, count, H, L, M,
            BLOCK_W=_pow2(W), BLOCK_R=4 if interp else 8, BLOCK_H=block_h, BLOCK_G=_pow2(H // FP8_GROUP),
            FP8=self.fp8, num_warps=4)
        handle = DispatchHandle(count, src_rank, src_slot, layout, T, K)
        return ((recv_x, recv_scale) if self.fp8 else recv_x), count, handle


# ---------------------------------------------------------------------------------------------- references
def _gather_all(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (shapes may differ along dim 0), by torch.distributed."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    ns = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    most = max(int(v) for v in ns)
    pad = torch.zeros((most,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad, group=group)
    return [p[:int(c)] for p, c in zip(parts, ns)]


def quantize_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [T, H] e4m3, scales [T, H/128] fp32)`` as the dispatch computes them: per group of 128 values,
    ``amax = max(|x|, 1e-4)``, ``values = x * (448 / amax)``, ``scale = amax / 448`` (fp32 arithmetic, correctly
    rounded divisions: tensor / tensor; torch computes ``448.0 / tensor`` as a reciprocal times 448, one ulp off)."""
    t, h = x.shape
    g = x.float().view(t, h // FP8_GROUP, FP8_GROUP)
    amax = g.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR)
    top = torch.full_like(amax, FP8_MAX)
    values = (g * torch.div(top, amax)[..., None]).to(FP8).view(t, h)
    return values, torch.div(amax, top)


def dispatch_reference(ctx: EPLowLatencyContext, x: torch.Tensor, topk_ids: torch.Tensor):
    """Torch: ``(rows [L] list of [recv_count[l], H] tensors, scales list or None, recv_count [L], src_rank list,
    src_slot list)`` this rank should receive (every rank's tokens gathered with torch.distributed), in the
    dispatch's order: source rank, then the source's pair order."""
    world = ctx.world
    xs = _gather_all(x, world.group)
    idss = _gather_all(topk_ids.to(torch.int64), world.group)
    L = ctx.local_experts
    rows, scales, ranks, slots = [], [], [], []
    for le in range(L):
        expert = world.rank * L + le
        r_rows, r_scales, r_ranks, r_slots = [], [], [], []
        for s, (xs_s, ids_s) in enumerate(zip(xs, idss)):
            flat = ids_s.reshape(-1)
            hit = torch.nonzero(flat == expert).flatten()  # pair order t * K + j
            tok = torch.div(hit, ctx.topk, rounding_mode="floor")
            sent = xs_s[tok]
            if ctx.fp8:
                v, sc = quantize_fp8_reference(sent) if sent.numel() else (sent.to(FP8), sent.new_empty(
                    (0, ctx.hidden // FP8_GROUP), dtype=torch.float32))
                r_rows.append(v)
                r_scales.append(sc)
            else:
                r_rows.append(sent)
            r_ranks.append(torch.full((hit.numel(),), s, dtype=torch.int32, device=x.device))
            r_slots.append(hit.to(torch.int32))
        rows.append(torch.cat(r_rows))
        scales.append(torch.cat(r_scales) if ctx.fp8 else None)
        ranks.append(torch.cat(r_ranks))
        slots.append(torch.cat(r_slots))
    count = torch.tensor([r.shape[0] for r in rows], dtype=torch.int32, device=x.device)
    return rows, (scales if ctx.fp8 else None), count, ranks, slots


def combine_reference(y_rows, topk_ids: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Torch: ``out[t] = sum_j w[t, j] * y_rows[t, j]`` over slots with ``topk_ids >= 0``, in ``j`` order in fp32
    (``y_rows`` [T, K, H]: the expert output of each pair), cast to ``dtype``."""
    t, k = topk_ids.shape
    acc = torch.zeros((t, y_rows.shape[-1]), dtype=torch.float32, device=y_rows.device)
    w = topk_weights.float()
    for j in range(k):
        term = w[:, j:j + 1] * y_rows[:, j].float()
        acc = torch.where((topk_ids[:, j] >= 0)[:, None], acc + term, acc)
    return acc.to(dtype)
