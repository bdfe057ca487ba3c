"""Expert-parallel dispatch and combine, the normal kind (prefill: thousands of tokens per rank): a packed receive
layout with per-expert offsets, no fixed slot per (expert, source, token).

Ranks, experts, pairs and their indices as in :mod:`.ep_low_latency` (rank ``r`` owns experts ``r * L .. r * L + L
- 1``; pair ``(t, j)``'s index ``i`` counts this rank's earlier pairs for the same expert). Each rank receives
``recv_x`` [R, H] (``R``: the context's ``max_recv_rows``): local expert ``l``'s rows at ``recv_offsets[l] ..
recv_offsets[l + 1]``, inside an expert source rank 0's rows first (in index order), then rank 1's, ... . So the
rows are what a grouped GEMM takes (``expert_offsets = recv_offsets``), and the layout needs every source's counts
before any row moves:

1. counts (one program): wait ``done[*] >= e - 2`` (every receiver finished reading parity ``p = e % 2``); this rank's
   pairs per expert (``routing.build_routing``'s counts, on the device) into ``cnt[p, me, :]`` of every rank, then
   ``flag1[p, me] = e`` there;
2. send (one program per token and ``BLOCK_H`` values): wait ``flag1[p, *] >= e``; pair ``(t, j)`` for expert ``(r,
   l)`` lands at row ``offset_r(l) + sum_{s < me} cnt[s, (r, l)] + i`` of rank ``r``'s buffer (``offset_r(l)``: the
   rows of ``r``'s experts before ``l``, from every source), with its return address ``t * K + j`` and source rank;
   rows at or past ``R`` are dropped and counted; the last program sets ``flag2[p, me] = e`` on every rank;
3. receive (programs over row tiles of ``R``): wait ``flag2[p, *] >= e``; copy the rows below the total into
   ``recv_x`` and the return addresses into the handle; program 0 writes ``recv_offsets`` and the (first row, rows)
   of every (expert, source) for the combine; the last program sets ``done[me] = e`` on every rank;
4. the combine of :class:`~.ep_low_latency.EPLowLatencyContext` (the same kernels: each (expert, source) block of
   rows back to its source, the weighted sum there in fp32, slot order).

Capacity: ``max_recv_rows`` bounds what one rank can receive (default ``2 * max_tokens * topk``: twice the average
under a balanced router; at most ``world * max_tokens * topk``). No host sync is needed, so a call can be captured in
a CUDA graph; ``dispatch(..., return_counts=True)`` copies the per-expert counts to the host (a sync) and raises
:class:`ValueError` when this rank's rows exceed the capacity (otherwise the rows past it are dropped: their tokens'
combine sums read stale rows). bf16, fp16 and fp32 rows (no fp8 in this mode yet).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels._common import label_words
from triton_dist.kernels.moe.ep_low_latency import (DispatchHandle, _arrive, _EPContext, _pick, _pow2,
                                                    _signal_every_rank)
from triton_dist.kernels.routing import build_routing


# ---------------------------------------------------------------------------------------------- device side
@triton.jit
def _counts_kernel(tally_ptr, cnt_ptr, flag_ptr, done_ptr, epoch_ptr, E, BLOCK_E: tl.constexpr):
    """One program: step 1 of the module docstring."""
    me = dl.rank()
    W = dl.num_ranks()
    e = tl.load(epoch_ptr) + 1
    p = e % 2
    token = dl.wait(done_ptr, W, "sys", "acquire", e - 2, cmp="ge")
    cnt = dl.consume_token(cnt_ptr, token)
    for r in range(W):
        for e0 in range(0, E, BLOCK_E):
            offs = e0 + tl.arange(0, BLOCK_E)
            m = offs < E
            tl.store(dl.symm_at(cnt + (p * W + me) * E + offs, r), tl.load(tally_ptr + offs, mask=m), mask=m)
    tl.debug_barrier()
    dl.fence("sys", "acq_rel")
    _signal_every_rank(flag_ptr + p * W + me, e)
    tl.store(epoch_ptr, e)


@triton.jit
def _send_kernel(x_ptr, ids_ptr, idx_ptr, buf_ptr, src_ptr, rank_ptr, cnt_ptr, flag1_ptr, flag2_ptr, epoch_ptr,
                 arrive_ptr, dropped_ptr, T, H, stride_x, L, R, HC,
                 K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """Program ``t * HC + c``: values ``c * BLOCK_H ..`` of token ``t``'s row for each of its pairs. Step 2."""
    me = dl.rank()
    W = dl.num_ranks()
    pid = tl.program_id(0)
    t = pid // HC
    c = pid % HC
    e = tl.load(epoch_ptr)
    p = e % 2
    E = L * W
    token = dl.wait(flag1_ptr + p * W, W, "sys", "acquire", e, cmp="ge")
    cnts = dl.consume_token(cnt_ptr, token) + p * W * E
    buf = dl.consume_token(buf_ptr, token)
    if t < T:
        offs_k = tl.arange(0, BLOCK_K)
        my = tl.load(ids_ptr + t * K + offs_k, mask=offs_k < K, other=-1)
        idx = tl.load(idx_ptr + t * K + offs_k, mask=offs_k < K, other=0)
        offs_h = c * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = offs_h < H
        xv = tl.load(x_ptr + t.to(tl.int64) * stride_x + offs_h, mask=hm, other=0.0)
        offs_w = tl.arange(0, BLOCK_W)
        offs_l = tl.arange(0, BLOCK_L)
        for j in tl.static_range(K):
            ej = _pick(my, offs_k, j)
            if (ej >= 0) & (ej < E):
                r = ej // L
                le = ej % L
                blk = tl.load(cnts + offs_w[:, None] * E + r * L + offs_l[None, :],
                              mask=(offs_w < W)[:, None] & (offs_l < L)[None, :], other=0)  # [source, r's expert]
                base = tl.sum(tl.where(offs_l < le, tl.sum(blk, axis=0), 0), axis=0)  # rows of r's experts < le
                col = tl.sum(tl.where(offs_l[None, :] == le, blk, 0), axis=1)  # expert ej's rows per source
                row = base + tl.sum(tl.where(offs_w < me, col, 0), axis=0) + _pick(idx, offs_k, j)
                if row < R:
                    at = (p * R + row).to(tl.int64)
                    tl.store(dl.symm_at(buf + at * H + offs_h, r), xv, mask=hm)
                    if c == 0:
                        tl.store(dl.symm_at(src_ptr + at, r), t * K + j)
                        tl.store(dl.symm_at(rank_ptr + at, r), me)
                elif c == 0:
                    dl.atomic_add(dropped_ptr, 1, "gpu", "relaxed")  # past the receiver's capacity
    if _arrive(arrive_ptr):
        _signal_every_rank(flag2_ptr + p * W + me, e)


@triton.jit
def _recv_kernel(buf_ptr, src_ptr, rank_ptr, cnt_ptr, flag2_ptr, done_ptr, epoch_ptr, arrive_ptr,
                 out_ptr, out_slot_ptr, out_rank_ptr, offsets_ptr, counts_ptr, layout_ptr, H, L, R,
                 BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``q``: rows ``q * BLOCK_R ..`` of the receive buffer (those below the total). Step 3."""
    me = dl.rank()
    W = dl.num_ranks()
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr)
    p = e % 2
    E = L * W
    token = dl.wait(flag2_ptr + p * W, W, "sys", "acquire", e, cmp="ge")
    offs_w = tl.arange(0, BLOCK_W)
    offs_l = tl.arange(0, BLOCK_L)
    m2 = (offs_w < W)[:, None] & (offs_l < L)[None, :]
    blk = tl.load(dl.consume_token(cnt_ptr, token) + (p * W + offs_w[:, None]) * E + me * L + offs_l[None, :],
                  mask=m2, other=0)  # [source, my expert]
    tot = tl.sum(blk, axis=0)
    total = tl.minimum(tl.sum(tot, axis=0), R)
    if pid == 0:
        ends = tl.cumsum(tot, 0)
        starts = ends - tot
        tl.store(offsets_ptr + 1 + offs_l, tl.minimum(ends, R), mask=offs_l < L)
        tl.store(offsets_ptr, 0)
        tl.store(counts_ptr + offs_l, tot, mask=offs_l < L)  # unclamped: the host's capacity check
        first = tl.minimum(starts[None, :] + tl.cumsum(blk, 0) - blk, R)  # sources before mine, inside the expert
        n = tl.minimum(blk, R - first)
        at = layout_ptr + (offs_l[None, :] * W + offs_w[:, None]) * 2
        tl.store(at, first, mask=m2)
        tl.store(at + 1, n, mask=m2)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < total
    at = (p * R + rows).to(tl.int64)
    buf = dl.consume_token(buf_ptr, token)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = rm[:, None] & (offs_h < H)[None, :]
        v = tl.load(buf + at[:, None] * H + offs_h[None, :], mask=mh)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + offs_h[None, :], v, mask=mh)
    tl.store(out_slot_ptr + rows, tl.load(dl.consume_token(src_ptr, token) + at, mask=rm), mask=rm)
    tl.store(out_rank_ptr + rows, tl.load(dl.consume_token(rank_ptr, token) + at, mask=rm), mask=rm)
    if _arrive(arrive_ptr):
        _signal_every_rank(done_ptr + me, e)


# ---------------------------------------------------------------------------------------------- host side
class EPNormalContext(_EPContext):
    """Buffers and epoch counters of the normal (prefill) dispatch / combine: up to ``max_tokens`` tokens per rank
    of ``hidden`` values (bf16, fp16 or fp32), ``topk`` of ``num_experts`` experts each, up to ``max_recv_rows``
    rows received per rank (default ``2 * max_tokens * topk``). Collective to make and to :meth:`close`.
    Symmetric memory per rank: about ``2 * max_recv_rows * H`` elements for the dispatch, ``2 * max_tokens * topk *
    H`` for the combine."""

    op = "ep_normal"

    def __init__(self, max_tokens: int, hidden: int, topk: int, num_experts: int, dtype: torch.dtype = torch.bfloat16,
                 *, max_recv_rows: int | None = None):
        what = type(self).__name__
        if max_recv_rows is not None and (not isinstance(max_recv_rows, int) or isinstance(max_recv_rows, bool)
                                          or max_recv_rows < 1):  # before any symmetric allocation
            raise ValueError(f"{what}: max_recv_rows must be an int >= 1, got {max_recv_rows!r}")
        super().__init__(max_tokens, hidden, topk, num_experts, dtype)
        w = self.world.world_size
        rows = 2 * max_tokens * topk if max_recv_rows is None else max_recv_rows
        self.max_recv_rows = rows = min(rows, w * max_tokens * topk)
        i32 = torch.int32
        self.n_buf = triton_dist.empty((2, rows, hidden), dtype)
        self.n_src = triton_dist.empty((2, rows), i32)
        self.n_rank = triton_dist.empty((2, rows), i32)
        self.n_cnt = triton_dist.zeros((2, w, num_experts), i32)
        self.n_flag1 = triton_dist.zeros((2, w), i32)
        self.n_flag2 = triton_dist.zeros((2, w), i32)
        self.n_done = triton_dist.zeros((w,), i32)
        self._symmetric += [self.n_buf, self.n_src, self.n_rank, self.n_cnt, self.n_flag1, self.n_flag2, self.n_done]
        dev = self.world.device
        self.epoch = torch.zeros(1, dtype=i32, device=dev)
        self.arrivals = torch.zeros(2, dtype=i32, device=dev)
        self.dropped = torch.zeros(1, dtype=i32, device=dev)  # pairs this rank could not place, over all calls
        op = self.op
        label_words(self.n_flag1, op, lambda i: (f"count flag (parity {i // w}) of rank {i % w}: its pairs per "
                                                 "expert", i % w))
        label_words(self.n_flag2, op, lambda i: (f"row flag (parity {i // w}) of rank {i % w}: its rows", i % w))
        label_words(self.n_done, op, lambda i: (f"done flag of rank {i}: it finished reading what this rank sent "
                                                "it two calls ago", i))
        self._ready()

    def _combine_rows(self, handle) -> tuple[tuple, bool, int]:
        return (self.max_recv_rows, self.hidden), False, 0

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, *, return_counts: bool = False):
        """Send each token's row to its top-k experts' ranks, packed by expert at the receiver (module docstring).
        ``x`` [T, H] (``T <= max_tokens``), ``topk_ids`` [T, K] in ``[-1, E)`` (distinct per token). Returns
        ``(recv_x [max_recv_rows, H], recv_offsets [L + 1] int32, handle)``; with ``return_counts`` also the
        per-expert counts as a host list (a sync; raises ValueError when they exceed ``max_recv_rows``).
        Collective; no host sync otherwise."""
        what = f"{self.op}.dispatch"
        self._check_open(what)
        T = self._check_x(what, x)
        ids = self._check_ids(what, topk_ids, T)
        W, L, H, K, R = self.world.world_size, self.local_experts, self.hidden, self.topk, self.max_recv_rows
        dev = x.device
        idx = self._publish_counts(ids)
        self._send(x, ids, idx)
        interp = self.world.interpreted
        block_h = min(_pow2(H), 256 if interp else 1024)
        recv_x = torch.empty((R, H), dtype=self.dtype, device=dev)
        src_slot = torch.empty((R,), dtype=torch.int32, device=dev)
        src_rank = torch.empty((R,), dtype=torch.int32, device=dev)
        offsets = torch.empty((L + 1,), dtype=torch.int32, device=dev)
        counts = torch.empty((L,), dtype=torch.int32, device=dev)
        layout = torch.empty((L, W, 2), dtype=torch.int32, device=dev)
        block_r = 4 if interp else 16
        _recv_kernel[(triton.cdiv(R, block_r),)](
            self.n_buf, self.n_src, self.n_rank, self.n_cnt, self.n_flag2, self.n_done, self.epoch,
            self.arrivals[1:], recv_x, src_slot, src_rank, offsets, counts, layout, H, L, R,
            BLOCK_W=_pow2(W), BLOCK_L=_pow2(L), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
        handle = DispatchHandle(counts, src_rank, src_slot, layout, T, K)
        if not return_counts:
            return recv_x, offsets, handle
        host = counts.tolist()
        if sum(host) > R:
            raise ValueError(f"{what}: this rank received {sum(host)} rows, the context holds max_recv_rows = {R}: "
                             "rows were dropped; make the context with a larger max_recv_rows")
        return recv_x, offsets, handle, host

    def _publish_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Step 1 (one launch after torch's routing): this rank's pairs per expert into every rank's table; returns
        each pair's index among this rank's pairs for its expert ([T, K] int32, on the device)."""
        E = self.num_experts
        key = torch.where((ids >= 0) & (ids < E), ids, E).to(torch.int64)  # an extra expert E for the -1 slots
        routing = build_routing(key, E + 1, check_ids=False)
        idx = (routing.scatter_index - routing.expert_offsets[key]).to(torch.int32).contiguous()
        tally = routing.counts[:E].to(torch.int32).contiguous()
        _counts_kernel[(1,)](tally, self.n_cnt, self.n_flag1, self.n_done, self.epoch, E,
                             BLOCK_E=min(_pow2(E), 1024), num_warps=4)
        return idx

    def _send(self, x: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor) -> None:
        """Step 2: every pair's row to its place at its receiver (after :meth:`_publish_counts`)."""
        W, L, H, K, R = self.world.world_size, self.local_experts, self.hidden, self.topk, self.max_recv_rows
        block_h = min(_pow2(H), 256 if self.world.interpreted else 1024)
        hc = triton.cdiv(H, block_h)
        T = x.shape[0]
        _send_kernel[(max(T, 1) * hc,)](
            x, ids, idx, self.n_buf, self.n_src, self.n_rank, self.n_cnt, self.n_flag1, self.n_flag2, self.epoch,
            self.arrivals, self.dropped, T, H, x.stride(0), L, R, hc,
            K=K, BLOCK_K=_pow2(K), BLOCK_W=_pow2(W), BLOCK_L=_pow2(L), BLOCK_H=block_h, num_warps=4)

    def dropped_pairs(self) -> int:
        """Pairs this rank could not place at their receiver (its capacity exceeded) over all calls so far (a host
        sync)."""
        return int(self.dropped.item())
