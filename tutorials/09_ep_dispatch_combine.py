"""Tutorial 9: expert-parallel MoE dispatch and combine, built from ``symm_at``, ``notify`` and ``wait``.

Run it with ``triton-dist run -n 2 tutorials/09_ep_dispatch_combine.py`` (any ``-n`` >= 2; GPUs when present,
otherwise a CPU world of processes running the kernels under Triton's interpreter).

A mixture-of-experts (MoE) layer sends every token to ``K`` of ``E`` experts (its *top-k*, picked by a router) and
sums the experts' outputs with the router's weights. With *expert parallelism* over ``W`` ranks, rank ``r`` owns
``L = E / W`` experts, ``r*L .. r*L + L-1``, while every rank keeps its own tokens (``x`` [T, H], ``T <= M``) and
their routing (``topk_ids`` [T, K], global expert ids, ``-1``: the slot is unused; ``topk_weights`` [T, K]). A
*pair* ``(t, j)`` is token ``t``'s copy for expert ``e = topk_ids[t, j]``. Each MoE layer then moves data twice:

* **dispatch**: each pair's row ``x[t]`` travels to the expert's rank ``e // L``, as local expert ``e % L``;
* the experts run on the rows they received (here a toy expert ``y = x * a_e + b_e``, so torch can check every bit);
* **combine**: each expert output row travels back to the rank of its token, and that rank sums
  ``out[t] = sum_j topk_weights[t, j] * y(t, j)`` over the valid slots, in ``j`` order, in fp32.

At decode a rank holds a few tokens, so the time is latency, not bandwidth. The *low-latency* design (DeepEP's)
gives every possible row a fixed slot in a symmetric buffer at the receiver: a sender computes where each row goes
without asking anyone (no count exchange first, no host sync), writes it there with plain stores through
``dl.symm_at``, and raises one flag per (sender, receiver) when it is done. The *index* ``i`` of pair ``(t, j)``
is the number of the sender's earlier pairs (in ``t*K + j`` order) for the same expert. A token picks an expert at
most once, so ``i < T <= M`` and ``M`` slots per (expert, sender) always suffice.

Buffers (symmetric: allocated with ``triton_dist.empty/zeros``, the same offset on every rank)::

    at the expert's rank (dispatch lands here)           at the token's rank (combine lands here)
    recv_buf [L][W][M][H]  row of pair i of source s     comb_buf [M*K][H]  row t*K + j: the expert output
    recv_src [L][W][M]     its t*K + j (return address)                     of pair (t, j)
    recv_cnt [W][L]        pairs source s sent to each l
    d_flag   [W]           call number: s's rows and     c_flag [W]        call number: rank r sent back every
                           counts are here                                 row it held of my tokens

    recv_buf on the rank that owns local expert l (W = 3 here; '#' a written row, '.' a slot left unwritten)

                 source 0          source 1          source 2
        l: [ # # # . . . . | # . . . . . . | # # . . . . . ]      M slots per source, index i = 0, 1, ...
            recv_cnt[0][l]=3   recv_cnt[1][l]=1   recv_cnt[2][l]=2

    recv_x [L][W*M][H] after the receive step: each expert's rows packed, in source-rank order

        l: [ s0 i0 | s0 i1 | s0 i2 | s1 i0 | s2 i0 | s2 i1 | unused ...      ]   recv_count[l] = 6
             offset 0 for source 0, offset 3 for source 1, offset 4 for source 2 (sum of the counts before it)

    comb_buf [M*K][H] on the token's rank, filled by the combine (K = 2 here)

        [ t0 j0 | t0 j1 | t1 j0 | t1 j1 | t2 j0 | ... ]      pair (t, j) at row t*K + j, whichever rank sent it

Every step is one kernel launch (or torch), issued in this order on every rank:

1. dispatch send, one program per token: for each valid slot ``j`` store ``x[t]`` into
   ``symm_at(recv_buf, e // L)[e % L, me, i]`` and ``t*K + j`` into ``recv_src`` there. The indices ``i`` and the
   per-expert counts are computed with torch on the host, to keep the kernel short.
2. dispatch signal, one program: store my counts for rank ``r``'s experts into ``recv_cnt[me]`` on rank ``r``,
   fence, then ``dl.notify(d_flag + me, r, call)`` on every rank ``r`` (release).
3. dispatch receive, one program per (local expert ``l``, source ``s``): ``dl.wait`` until ``d_flag[*] >= call``
   (acquire), offset = the counts of the sources before ``s``, copy the ``n`` rows into ``recv_x[l, offset + i]``
   and their return addresses into ``src_slot``; keep ``(offset, n)`` in ``layout`` for the combine.
4. the experts, in torch: ``y[l, :recv_count[l]]`` from ``recv_x[l, :recv_count[l]]``.
5. combine send, one program per (``l``, ``s``): rows ``offset .. offset + n`` of ``y[l]`` go to
   ``symm_at(comb_buf, s)[src_slot]``.
6. combine signal, one program: fence, then ``c_flag[me] = call`` on every rank.
7. combine receive, one program per token: wait ``c_flag[*] >= call``, then the weighted sum over ``j``.

Why the signals are launches of their own: a flag may only go up once *every* program of the send kernel has stored
its rows, and a program must never wait for another program of its own launch (tutorial 2: the CPU world runs them
one at a time, and a GPU does not promise to run them together). A one-program kernel queued after the send kernel
on the same stream starts only when the send kernel has finished; its fence and release notify then publish all of
those stores. Every wait depends only on signal kernels, which wait for nothing, so no rank can deadlock.

Reuse: a flag holds the call number, so it is never reset (``cmp="ge"``); a host barrier between calls keeps a fast
rank from writing call ``e + 1``'s rows into a buffer that a slow rank still reads for call ``e``. The library's
``triton_dist.moe.EPLowLatencyContext`` removes that barrier (two buffers by call parity, "done" flags), raises the
flags from the last program of each send kernel (an arrival counter) instead of a separate launch, numbers the
pairs on the device and can send fp8 rows. This tutorial checks its own kernels and the library against torch,
bit for bit.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist import moe


@triton.jit
def dispatch_send_kernel(x_ptr, ids_ptr, idx_ptr, recv_buf_ptr, recv_src_ptr, H, L, M,
                         K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``t``: store token ``t``'s row for each valid slot ``j`` at ``[e % L, me, i]`` of
    ``recv_buf`` on rank ``e // L`` (``i = idx[t, j]``), and its return address ``t*K + j`` in ``recv_src``."""
    me = dl.rank()
    W = dl.num_ranks()
    t = tl.program_id(0)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + j)
        if e >= 0:
            dest = e // L
            row = ((e % L) * W + me) * M + tl.load(idx_ptr + t * K + j)  # [l][s][i] flattened
            for h0 in range(0, H, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                v = tl.load(x_ptr + t * H + offs, mask=offs < H)
                tl.store(dl.symm_at(recv_buf_ptr + row * H + offs, dest), v, mask=offs < H)
            tl.store(dl.symm_at(recv_src_ptr + row, dest), t * K + j)


@triton.jit
def signal_kernel(flag_ptr, call, counts_ptr, recv_cnt_ptr, L, SEND_COUNTS: tl.constexpr, BLOCK_L: tl.constexpr):
    """One program, launched after a send kernel: (with ``SEND_COUNTS``) store ``counts[r*L : r*L + L]`` into
    ``recv_cnt[me]`` on every rank ``r``; then set ``flag[me] = call`` on every rank (fence, release notify)."""
    me = dl.rank()
    W = dl.num_ranks()
    if SEND_COUNTS:
        offs = tl.arange(0, BLOCK_L)
        for r in range(W):
            c = tl.load(counts_ptr + r * L + offs, mask=offs < L)
            tl.store(dl.symm_at(recv_cnt_ptr + me * L + offs, r), c, mask=offs < L)
    tl.debug_barrier()  # every thread of this program has stored its counts ...
    dl.fence("sys", "acq_rel")  # ... and they, and the previous kernel's rows, are visible before any flag
    for r in range(W):
        dl.notify(flag_ptr + me, r, call, "set", "intra_node")


@triton.jit
def dispatch_recv_kernel(recv_buf_ptr, recv_src_ptr, recv_cnt_ptr, flag_ptr, call, recv_x_ptr, src_slot_ptr,
                         layout_ptr, count_ptr, H, L, M, BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``(l, s)``: once every source's flag reads ``call``, copy the rows source ``s`` sent local expert
    ``l`` to ``recv_x[l, offset + i]`` (offset: the counts of sources ``< s``) and their ``t*K + j`` to
    ``src_slot``; ``layout[l, s] = (offset, n)``; the last source also stores ``count[l]``."""
    le = tl.program_id(0)
    s = tl.program_id(1)
    W = dl.num_ranks()
    token = dl.wait(flag_ptr, W, "sys", "acquire", call, cmp="ge")  # all W flags, one per source
    offs_w = tl.arange(0, BLOCK_W)
    cnts = tl.load(dl.consume_token(recv_cnt_ptr, token) + offs_w * L + le, mask=offs_w < W, other=0)
    n = tl.sum(tl.where(offs_w == s, cnts, 0), axis=0)
    off = tl.sum(tl.where(offs_w < s, cnts, 0), axis=0)
    buf = dl.consume_token(recv_buf_ptr, token)
    src = dl.consume_token(recv_src_ptr, token)
    first_in = (le * W + s) * M  # row of index 0 in recv_buf
    first_out = le * W * M + off  # its row in recv_x
    for i in range(n):
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            v = tl.load(buf + (first_in + i) * H + offs, mask=offs < H)
            tl.store(recv_x_ptr + (first_out + i) * H + offs, v, mask=offs < H)
        tl.store(src_slot_ptr + first_out + i, tl.load(src + first_in + i))
    tl.store(layout_ptr + (le * W + s) * 2, off)
    tl.store(layout_ptr + (le * W + s) * 2 + 1, n)
    if s == W - 1:
        tl.store(count_ptr + le, off + n)


@triton.jit
def combine_send_kernel(y_ptr, src_slot_ptr, layout_ptr, comb_buf_ptr, H, M, BLOCK_H: tl.constexpr):
    """Program ``(l, s)``: send rows ``offset .. offset + n`` of ``y[l]`` (those source ``s`` dispatched) back to
    ``comb_buf[t*K + j]`` on rank ``s``."""
    le = tl.program_id(0)
    s = tl.program_id(1)
    W = dl.num_ranks()
    off = tl.load(layout_ptr + (le * W + s) * 2)
    n = tl.load(layout_ptr + (le * W + s) * 2 + 1)
    for i in range(n):
        row = le * W * M + off + i  # in recv_x / y
        dst = dl.symm_at(comb_buf_ptr + tl.load(src_slot_ptr + row) * H, s)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            tl.store(dst + offs, tl.load(y_ptr + row * H + offs, mask=offs < H), mask=offs < H)


@triton.jit
def combine_recv_kernel(ids_ptr, w_ptr, comb_buf_ptr, flag_ptr, call, out_ptr, H,
                        K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``t``: once every rank's flag reads ``call``, ``out[t] = sum_j w[t, j] * comb_buf[t*K + j]`` over
    the valid slots, in ``j`` order, in fp32."""
    t = tl.program_id(0)
    token = dl.wait(flag_ptr, dl.num_ranks(), "sys", "acquire", call, cmp="ge")
    buf = dl.consume_token(comb_buf_ptr, token)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            if tl.load(ids_ptr + t * K + j) >= 0:
                v = tl.load(buf + (t * K + j) * H + offs, mask=offs < H, other=0.0).to(tl.float32)
                acc = acc + tl.load(w_ptr + t * K + j) * v
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


class TinyEP:
    """The tutorial's dispatch / combine: symmetric buffers for up to ``max_tokens`` tokens of ``hidden`` values per
    rank, ``topk`` of ``num_experts`` experts each. Collective to make and to close."""

    def __init__(self, max_tokens: int, hidden: int, topk: int, num_experts: int, dtype: torch.dtype):
        self.world = triton_dist.current_world()
        W = self.world.world_size
        self.M, self.H, self.K, self.E, self.L = max_tokens, hidden, topk, num_experts, num_experts // W
        self.recv_buf = triton_dist.empty((self.L, W, self.M, hidden), dtype)
        self.recv_src = triton_dist.empty((self.L, W, self.M), torch.int32)
        self.recv_cnt = triton_dist.empty((W, self.L), torch.int32)
        self.d_flag = triton_dist.zeros((W,), torch.int32)
        self.comb_buf = triton_dist.empty((self.M * topk, hidden), dtype)
        self.c_flag = triton_dist.zeros((W,), torch.int32)
        self.call = 0
        self.block_h = min(triton.next_power_of_2(hidden), 128 if self.world.interpreted else 1024)
        triton_dist.barrier()  # every flag is zero before anyone raises one

    def pair_indices(self, ids: torch.Tensor):
        """Torch, on the sender: ``(idx [T, K], counts [E])``: each pair's index among this rank's pairs for its
        expert (``t*K + j`` order), and the pairs per expert (rank ``r``'s experts are ``counts[r*L : r*L + L]``)."""
        flat = ids.reshape(-1).long()
        onehot = (flat[:, None] == torch.arange(self.E, device=ids.device)[None, :]).to(torch.int32)  # -1: all 0
        earlier = onehot.cumsum(0) - onehot  # pairs before this one, per expert
        idx = earlier.gather(1, flat.clamp(min=0)[:, None]).reshape(ids.shape)
        return idx.to(torch.int32).contiguous(), onehot.sum(0).to(torch.int32)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor):
        """Steps 1-3: ``(recv_x [L, W*M, H], recv_count [L], (src_slot, layout))``."""
        self.call += 1
        W, L, M, H, K = self.world.world_size, self.L, self.M, self.H, self.K
        T = x.shape[0]
        idx, counts = self.pair_indices(ids)
        dispatch_send_kernel[(T,)](x, ids, idx, self.recv_buf, self.recv_src, H, L, M, K=K, BLOCK_H=self.block_h)
        signal_kernel[(1,)](self.d_flag, self.call, counts, self.recv_cnt, L, SEND_COUNTS=True,
                            BLOCK_L=triton.next_power_of_2(L))
        dev = x.device
        recv_x = torch.empty((L, W * M, H), dtype=x.dtype, device=dev)
        src_slot = torch.empty((L, W * M), dtype=torch.int32, device=dev)
        layout = torch.empty((L, W, 2), dtype=torch.int32, device=dev)
        count = torch.empty((L,), dtype=torch.int32, device=dev)
        dispatch_recv_kernel[(L, W)](self.recv_buf, self.recv_src, self.recv_cnt, self.d_flag, self.call, recv_x,
                                     src_slot, layout, count, H, L, M, BLOCK_W=triton.next_power_of_2(W),
                                     BLOCK_H=self.block_h)
        return recv_x, count, (src_slot, layout)

    def combine(self, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, handle) -> torch.Tensor:
        """Steps 5-7: ``out [T, H]``, the weighted sum of each token's expert outputs."""
        W, L, M, H, K = self.world.world_size, self.L, self.M, self.H, self.K
        src_slot, layout = handle
        combine_send_kernel[(L, W)](y, src_slot, layout, self.comb_buf, H, M, BLOCK_H=self.block_h)
        signal_kernel[(1,)](self.c_flag, self.call, self.c_flag, self.c_flag, L, SEND_COUNTS=False, BLOCK_L=1)
        T = ids.shape[0]
        out = torch.empty((T, H), dtype=y.dtype, device=y.device)
        combine_recv_kernel[(T,)](ids, weights, self.comb_buf, self.c_flag, self.call, out, H, K=K,
                                  BLOCK_H=self.block_h, enable_fp_fusion=False)  # no FMA: the same bits as torch
        return out

    def close(self) -> None:
        triton_dist.barrier()
        for t in (self.recv_buf, self.recv_src, self.recv_cnt, self.d_flag, self.comb_buf, self.c_flag):
            triton_dist.free(t)


def experts(recv_x: torch.Tensor, recv_count: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int):
    """The toy experts of this rank: ``y[l, :n] = recv_x[l, :n] * a[e] + b[e]`` for global expert ``e``."""
    L = recv_x.shape[0]
    y = torch.zeros_like(recv_x)
    for le, n in enumerate(recv_count.tolist()):
        y[le, :n] = recv_x[le, :n] * a[rank * L + le] + b[rank * L + le]
    return y


def gather_tokens(x: torch.Tensor, max_tokens: int, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (up to ``max_tokens`` rows each), by torch.distributed."""
    n = torch.tensor([x.shape[0]], device=x.device)
    ns = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ns, n, group=group)
    pad = torch.zeros((max_tokens,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in ns]
    dist.all_gather(parts, pad, group=group)
    return [p[:int(c)] for p, c in zip(parts, ns)]


def inputs(rank: int, call: int, M: int, H: int, K: int, E: int, dtype, device):
    """This rank's tokens, routing and weights of ``call``: random, different per rank, never all zeros. Expert
    ``E - 1`` is never picked (it receives nothing) and about one slot in five is ``-1`` (sends nothing)."""
    g = torch.Generator().manual_seed(7919 * call + rank)
    T = max(1, M - 2 * rank)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.rand(T, E - 1, generator=g).argsort(dim=1)[:, :K].to(torch.int32)  # K distinct experts
    ids[torch.rand(T, K, generator=g) < 0.2] = -1
    weights = torch.rand(T, K, generator=g) + 0.1
    return x.to(device), ids.to(device), weights.to(device)


def main() -> None:
    world = triton_dist.init()
    if world.world_size < 2:
        raise SystemExit("run with at least 2 ranks: triton-dist run -n 2 tutorials/09_ep_dispatch_combine.py")
    gpu = not world.interpreted
    rank, W = world.rank, world.world_size
    # CPU world: tiny shapes (the interpreter is slow); GPU: a decode batch of 64 tokens, hidden 2048, top-4
    M, H, K, L, calls = (64, 2048, 4, 4, 3) if gpu else (6, 80, 3, 2, 2)
    E = L * W
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator().manual_seed(12345)  # the experts' parameters: the same on every rank
    a = (torch.rand(E, H, generator=g) + 0.5).to(dtype).to(world.device)
    b = torch.randn(E, H, generator=g).to(dtype).to(world.device)
    ours = TinyEP(M, H, K, E, dtype)
    lib = moe.EPLowLatencyContext(M, H, K, E, dtype)

    failed, pairs, rows = [], 0, 0
    for call in range(1, calls + 1):
        x, ids, weights = inputs(rank, call, M, H, K, E, dtype, world.device)
        recv_x, recv_count, handle = ours.dispatch(x, ids)
        y = experts(recv_x, recv_count, a, b, rank)
        out = ours.combine(y, ids, weights, handle)
        pairs += int((ids >= 0).sum())
        rows += int(recv_count.sum())

        # torch, dispatch: the rows every rank sent my experts, gathered with torch.distributed, in source order
        xs, idss = gather_tokens(x, M, world.group), gather_tokens(ids, M, world.group)
        for le in range(L):
            hits = [torch.nonzero(i.reshape(-1) == rank * L + le).flatten() for i in idss]  # t*K + j order
            want_x = torch.cat([xs_s[h // K] for xs_s, h in zip(xs, hits)])
            want_slot = torch.cat(hits).to(torch.int32)
            n = int(recv_count[le])
            if n != want_x.shape[0] or not torch.equal(recv_x[le, :n], want_x) or \
                    not torch.equal(handle[0][le, :n], want_slot):
                failed.append(f"call {call}: dispatch to local expert {le}")
        # torch, combine: out[t] = sum_j w[t, j] * expert_e(x[t]) over the valid slots, fp32 in j order
        e = ids.clamp(min=0).long()
        acc = torch.zeros((x.shape[0], H), dtype=torch.float32, device=x.device)
        for j in range(K):
            y_j = (x * a[e[:, j]] + b[e[:, j]]).float()
            acc = torch.where((ids[:, j] >= 0)[:, None], acc + weights[:, j:j + 1] * y_j, acc)
        if not torch.equal(out, acc.to(dtype)):
            failed.append(f"call {call}: combine vs torch")

        # the library: the same dispatch and combine, bit for bit
        lib_x, lib_count, lib_handle = lib.dispatch(x, ids)
        if not torch.equal(lib_count, recv_count) or not all(
                torch.equal(lib_x[le, :n], recv_x[le, :n]) for le, n in enumerate(recv_count.tolist())):
            failed.append(f"call {call}: dispatch vs EPLowLatencyContext")
        lib_out = lib.combine(experts(lib_x, lib_count, a, b, rank), ids, weights, lib_handle)
        if not torch.equal(lib_out, out):
            failed.append(f"call {call}: combine vs EPLowLatencyContext")
        triton_dist.barrier()  # every rank is done reading this call's buffers before anyone writes the next

    line = (f"rank {rank}: MISMATCH in " + "; ".join(failed)) if failed else (
        f"rank {rank}: sent {pairs} pairs, received {rows} rows in {calls} calls; exact vs torch and "
        "EPLowLatencyContext")
    lines = [None] * W
    dist.all_gather_object(lines, line, group=world.group)  # printed by rank 0, in rank order
    ok = not any("MISMATCH" in text for text in lines)
    if rank == 0:
        print(f"EP dispatch/combine: {W} ranks, backend {world.backend}, {E} experts ({L} per rank), top-{K}, "
              f"up to {M} tokens of {H} {str(dtype).replace('torch.', '')} per rank")
        print("\n".join(lines))
        print(f"match: {'yes' if ok else 'no'}")
    lib.close()
    ours.close()
    triton_dist.finalize()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
