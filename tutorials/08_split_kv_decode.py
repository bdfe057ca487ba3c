"""Tutorial 8: decode attention split over the KV sequence, merged by log-sum-exp, within a GPU and across ranks.

Run it with ``triton-dist run -n 2 tutorials/08_split_kv_decode.py`` (any ``-n``; GPUs when present, otherwise the
CPU world's interpreter).

At decode one new query per sequence attends to every cached key: ``out = softmax(q K^T * scale) V``. With one
program per (sequence, head) a batch of 1 uses 32 programs of a 132-SM GPU, so the KV read (the whole cost) crawls.
Split the keys instead: program ``(b, h, s)`` handles keys ``[s*L, (s+1)*L)`` and returns a *normalised* partial
output and the log-sum-exp of its scores::

    m   = max_j s_j                 s_j = q . k_j * scale, over my keys only
    lse = m + log(sum_j exp(s_j - m))
    o   = sum_j exp(s_j - lse) v_j  (= softmax over my keys, times V)

Two partials over disjoint key sets merge exactly (no approximation)::

    lse = log(exp(lse_a) + exp(lse_b))           (computed as hi + log(exp(lse_a - hi) + exp(lse_b - hi)))
    o   = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

and the merge is associative and commutative, so the partials can come from programs of one kernel (split-KV) or
from ranks that each hold a shard of the sequence (sequence-parallel decode): the same merge, a different place.
An empty split (a short sequence, or a rank with no keys of this sequence) has ``lse = -inf`` and weight 0.

This tutorial builds both steps with the simplest kernels (one program per (sequence, head, split), keys in tiles
of ``BLOCK`` with a dot product by broadcasting), merges across ranks with ``torch.distributed.all_gather``, and
checks everything against torch and against the library: ``ops.flash_decode`` (one kernel for all the heads of a
GQA group with ``tl.dot``, pages, a tuned split count) and ``ops.sp_flash_decode`` (the partials gathered by our
low-latency protocol, merged on the device).
"""
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
from triton_dist import ops


@triton.jit
def partial_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, lse_ptr, T, H, keys_per_split, scale,
                   D: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B, H, S): program (b, h, s) attends q[b, h] to keys [s*L, min((s+1)*L, len_b)) of k/v[b, :, h]
    (layout [B, T, H, D]) and writes its normalised partial o[b, h, s] and lse[b, h, s] (-inf when empty)."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = tl.num_programs(2)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * H + h) * D + d).to(tl.float32)
    start = s * keys_per_split
    end = tl.minimum(start + keys_per_split, tl.load(lens_ptr + b))
    m = float("-inf")
    total = 0.0
    acc = tl.zeros((D,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        rows = ((b * T + j) * H + h) * D
        ok = j < end
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        sc = tl.where(ok, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 0))  # finite: each tile has at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        total = total * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    empty = total == 0.0
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
    tl.store(o_ptr + ((b * H + h) * S + s) * D + d, acc / tl.where(empty, 1.0, total))
    tl.store(lse_ptr + (b * H + h) * S + s, lse)


@triton.jit
def merge_kernel(o_ptr, lse_ptr, out_ptr, S, D: tl.constexpr):
    """Grid (B * H,): merge the S partials of row r: out[r] = sum_s exp(lse_s - lse) o_s."""
    r = tl.program_id(0)
    d = tl.arange(0, D)
    hi = float("-inf")
    for s in range(S):
        hi = tl.maximum(hi, tl.load(lse_ptr + r * S + s))
    hi = tl.where(hi == float("-inf"), 0.0, hi)
    total = 0.0
    acc = tl.zeros((D,), dtype=tl.float32)
    for s in range(S):
        w = tl.exp(tl.load(lse_ptr + r * S + s) - hi)
        total += w
        acc += w * tl.load(o_ptr + (r * S + s) * D + d)
    tl.store(out_ptr + r * D + d, acc / tl.where(total == 0.0, 1.0, total))


def split_kv_partials(q, k, v, lens, splits: int, block: int):
    """Partials ``(o [B, H, S, D], lse [B, H, S])`` of ``S = splits`` key ranges (MHA: as many kv heads as q heads)."""
    b, h, d = q.shape
    t = k.shape[1]
    per = triton.cdiv(triton.cdiv(t, splits), block) * block  # keys per split: whole tiles
    o = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    partial_kernel[(b, h, splits)](q, k, v, lens, o, lse, t, h, per, 1 / math.sqrt(d), D=d, BLOCK=block)
    return o, lse


def merge(o, lse):
    """Merge the partials along dim 2 with the kernel above: ``[B, H, S, D]`` -> ``[B, H, D]`` fp32."""
    b, h, s, d = o.shape
    out = torch.empty((b, h, d), dtype=torch.float32, device=o.device)
    merge_kernel[(b * h,)](o, lse, out, s, D=d)
    return out


def torch_attention(q, k, v, lens):
    """fp32 softmax attention of q[b] over the first lens[b] keys of k/v[b] ([B, T, H, D] layout)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens.tolist()):
        s = torch.einsum("hd,thd->ht", q[b].float(), k[b, :n].float()) / math.sqrt(q.shape[-1])
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, -1), v[b, :n].float()) if n else 0
    return out


def main() -> None:
    world = triton_dist.init()
    gpu = not world.interpreted
    rank, n = world.rank, world.world_size
    # CPU world: tiny shapes (the interpreter is slow); GPU: 4 sequences of up to 8k keys, 8 heads of 128
    b, h, d, t, splits, block = (4, 8, 128, 8192, 16, 64) if gpu else (3, 2, 64, 96, 4, 16)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator().manual_seed(11)  # the same query on every rank
    q = torch.randn(b, h, d, generator=g).to(dtype).to(world.device)
    g.manual_seed(100 + rank)  # this rank's shard of every sequence's keys
    k = torch.randn(b, t, h, d, generator=g).to(dtype).to(world.device)
    v = torch.randn(b, t, h, d, generator=g).to(dtype).to(world.device)
    lens = torch.tensor([(t * (i + 1 + rank)) // (b + n) for i in range(b)], dtype=torch.int32)
    lens[0] = 0 if rank == 0 else lens[0]  # rank 0 holds none of sequence 0's keys
    lens = lens.to(world.device)

    # 1. within the GPU: split-KV over my shard, merged by the kernel
    o, lse = split_kv_partials(q, k, v, lens, splits, block)
    mine = merge(o, lse)
    err_local = (mine - torch_attention(q, k, v, lens)).abs().max().item()

    # 2. across ranks: my shard's result is itself a partial; gather (o, lse) of every rank and merge the same way.
    # A merged partial's lse is the lse of its parts (logsumexp over the splits).
    my_lse = torch.logsumexp(lse, dim=-1)
    parts = [torch.empty_like(mine) for _ in range(n)]
    lses = [torch.empty_like(my_lse) for _ in range(n)]
    dist.all_gather(parts, mine, group=world.group)
    dist.all_gather(lses, my_lse, group=world.group)
    everyone = merge(torch.stack(parts, 2).contiguous(), torch.stack(lses, 2).contiguous())
    # torch: attention over the concatenation of every rank's keys
    ks = [torch.empty_like(k) for _ in range(n)]
    vs = [torch.empty_like(v) for _ in range(n)]
    ls = [torch.empty_like(lens) for _ in range(n)]
    dist.all_gather(ks, k, group=world.group)
    dist.all_gather(vs, v, group=world.group)
    dist.all_gather(ls, lens, group=world.group)
    cat_k = torch.zeros((b, n * t, h, d), dtype=dtype, device=world.device)
    cat_v = torch.zeros_like(cat_k)
    total = torch.zeros(b, dtype=torch.int32)
    for r in range(n):
        for i, m in enumerate(ls[r].tolist()):
            cat_k[i, total[i]:total[i] + m] = ks[r][i, :m]
            cat_v[i, total[i]:total[i] + m] = vs[r][i, :m]
            total[i] += m
    truth = torch_attention(q, cat_k, cat_v, total.to(world.device))
    err_sp = (everyone - truth).abs().max().item()

    # 3. the library: the same two steps, tuned (ops.flash_decode) and over our LL all-gather (ops.sp_flash_decode)
    err_lib = max((ops.flash_decode(q, k, v, lens).float() - torch_attention(q, k, v, lens)).abs().max().item(),
                  (ops.sp_flash_decode(q, k, v, lens).float() - truth).abs().max().item())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    worst = torch.tensor([err_local, err_sp, err_lib], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=world.group)
    ok = bool((worst <= tol).all())
    if rank == 0:
        print(f"split-KV decode: {n} rank(s), backend {world.backend}, B={b} H={h} D={d}, up to {t} keys per rank, "
              f"{splits} splits, {str(dtype).replace('torch.', '')}")
        print(f"largest error vs torch: one GPU {worst[0]:.3g}, across ranks {worst[1]:.3g}, library "
              f"(ops.flash_decode, ops.sp_flash_decode) {worst[2]:.3g}")
        print(f"match: {'yes' if ok else 'no'}")
    ops.release_contexts()
    triton_dist.finalize()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
