"""Sequence-parallel prefill attention: Q stays on its rank, K/V are all-gathered while the attention runs.

Shards (``W`` ranks; packed sequences as in :func:`~triton_dist.kernels.attention.flash_attn.flash_attn_varlen`):
every rank holds, of each sequence ``b``, ``n_b = cu_seqlens[b+1] - cu_seqlens[b]`` tokens of q / k / v (the same
``cu_seqlens`` on every rank: each sequence is ``W * n_b`` tokens long). With ``zigzag`` the sequence is cut into
``2W`` chunks of ``C = n_b / 2`` tokens and rank ``r`` holds chunks ``r`` and ``2W-1-r`` (in that order): under a
causal mask every rank then has the same work (a short and a long row of the triangle). Without it rank ``r`` holds
chunk ``r`` of ``W``. Every rank returns its own queries' output ``[total, Hq, D]`` (and lse).

Overlap: one call packs this rank's K and V rows into ``[total, 2 * Hkv * D]`` and gathers them into the context's
symmetric buffer by :func:`~triton_dist.kernels.ag_gemm.gather_chunks` (``copy_engine``: DMA between one-program
step kernels; ``sm``: a pull kernel on a few SMs), which raises ``flag[src]`` when rank ``src``'s rows are in. The
attention kernel, a persistent loop over (row block, sequence, q head) on the remaining SMs, folds in its own rank's
chunks first (no wait), then each peer's after waiting for that peer's flag, rotating ``rank+1, rank+2, ...`` as the
gather fills them, and skips the chunks its causal mask hides (no wait either). Each key chunk goes through
:func:`~triton_dist.kernels.attention.flash_attn.attend_rows` with the causal offset of the two chunks' global
positions, so the math (base-2 online softmax, unmasked bulk, masked diagonal) is the local kernel's.

Signals, epochs and signatures are ag_gemm's (one gather per call; the epoch bumped on the stream, nothing reset), so
a call is CUDA-graph capturable once its context exists. In the CPU world the gather runs before the attention.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels import ag_gemm as _agg
from triton_dist.kernels._common import call_signature
from triton_dist.kernels.gemm import check_out, dot_precision, fence_async_proxy

from ._common import DTYPES, LOG2E, attention_rows_reference, check_heads, check_tensor, default_scale, finish_rows
from .flash_attn import attend_rows, default_config, load_rows

METHODS = ("copy_engine", "sm")


@triton.jit
def _chunk_of(rank, slot, world, SLOTS: tl.constexpr):
    """Global chunk index of a rank's ``slot``-th local chunk (zig-zag: ``r`` and ``2W-1-r``; else ``r``)."""
    if SLOTS == 2:
        return tl.where(slot == 0, rank, 2 * world - 1 - rank)
    return rank


@triton.jit
def _sp_ag_attn_kernel(q, kv_k, kv_v, o, lse, cu, sig_ptr, epoch_ptr, B, HQ, GROUP, blocks_per_slot, total,
                       stride_qt, stride_qh, stride_kvt, qk_scale2, softcap,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
                       CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, STORE_LSE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Persistent: program ``p`` takes work items ``p, p + nprog, ...`` of ``SLOTS * blocks_per_slot * B * HQ``
    (row blocks innermost, as :func:`.flash_attn._flash_attn_kernel`: the programs at work read the same head's K/V;
    the long zig-zag chunk's blocks first, then the q heads of a kv head one after the other). Item: rows
    ``row0 ..`` of local chunk ``slot`` of sequence ``b``, q head ``h``. ``kv_k`` / ``kv_v``: the gathered buffer's K
    and V (descriptors or pointers: row ``src * total + t`` is token ``t`` of rank ``src``'s shard)."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr)
    items = SLOTS * blocks_per_slot * B * HQ
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        blk = SLOTS * blocks_per_slot - 1 - item % (SLOTS * blocks_per_slot)  # the last slot (zig-zag: the long
        rest = item // (SLOTS * blocks_per_slot)  # chunk) first
        h = rest % HQ
        b = rest // HQ
        slot = blk // blocks_per_slot
        row0 = (blk % blocks_per_slot) * BLOCK_M
        tok0 = tl.load(cu + b)
        c = (tl.load(cu + b + 1) - tok0) // SLOTS  # tokens per chunk of this sequence
        if row0 < c:
            cq = _chunk_of(rank, slot, world, SLOTS)
            qb = load_rows(q + h * stride_qh, tok0 + slot * c, row0, c, stride_qt, BLOCK_M, HEAD_DIM)
            acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for i in range(world):
                src = (rank + i) % world
                for s in tl.static_range(SLOTS):
                    ck = _chunk_of(src, s, world, SLOTS)
                    if CAUSAL:
                        visible = ck <= cq  # chunks after mine are hidden by the mask: no wait, no work
                    else:
                        visible = ck >= 0
                    if visible:
                        token = dl.wait(sig_ptr + world + src, 1, "sys", "acquire", e, cmp="ge")
                        k_src = dl.consume_token(kv_k, token)
                        v_src = dl.consume_token(kv_v, token)
                        if USE_TMA:
                            fence_async_proxy()  # the peers' rows came by the generic proxy, TMA reads by the async
                        acc, m_i, l_i = attend_rows(acc, m_i, l_i, qb, k_src, v_src, src * total + tok0 + s * c,
                                                    h // GROUP, 0, c, row0, (cq - ck) * c, stride_kvt, HEAD_DIM,
                                                    stride_kvt, HEAD_DIM, qk_scale2, softcap, BLOCK_M, BLOCK_N,
                                                    HEAD_DIM, CAUSAL, SOFTCAP, USE_TMA, DOT_PRECISION)
            out, row_lse = finish_rows(acc, m_i, l_i)
            rows = row0 + tl.arange(0, BLOCK_M)
            keep = rows < c
            tok = (tok0 + slot * c + rows).to(tl.int64)
            d = tl.arange(0, HEAD_DIM)
            tl.store(o + (tok * HQ + h)[:, None] * HEAD_DIM + d[None, :], out.to(o.dtype.element_ty),
                     mask=keep[:, None])
            if STORE_LSE:
                tl.store(lse + tok * HQ + h, row_lse, mask=keep)


class SpAgAttentionContext(_agg.AGGemmContext):
    """The gathered K/V buffer (``max_m`` tokens of all ranks x ``k = 2 * Hkv * D``, symmetric), signals, epoch and
    side stream of :func:`sp_ag_attention` calls (ag_gemm's context; ``n`` is unused). Made once, reused."""

    op = "sp_ag_attention"


def check_inputs(what, q, k, v, cu_seqlens, zigzag, method):
    """Shapes, dtypes, heads and method of a call; returns ``cu_seqlens`` on q's device and the local lengths (None
    where ``cu_seqlens`` is on the device: not read back)."""
    check_tensor(what, "q", q, 3, DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(what, name, t, 3, (q.dtype,), q.device)
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{what}: {name} has {t.shape[0]} tokens, q {q.shape[0]}; the shards must be the same "
                             "tokens")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{what}: k has {k.shape[1]} heads and v {v.shape[1]}")
    check_heads(what, q.shape[1], k.shape[1], q.shape[2], k.shape[2], v.shape[2])
    if method not in ("auto",) + METHODS:
        raise ValueError(f"{what}: method must be 'auto' or one of {METHODS}, got {method!r}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    check_tensor(what, "cu_seqlens", cu_seqlens, 1, (torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{what}: cu_seqlens needs at least 2 entries (B + 1), got {cu_seqlens.numel()}")
    lens = None
    if cu_seqlens.device.type == "cpu":
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if int(cu_seqlens[0]) != 0 or min(lens) < 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"{what}: cu_seqlens must be prefix sums from 0 to q's {q.shape[0]} tokens, got "
                             f"{cu_seqlens.tolist()}")
        cu_seqlens = cu_seqlens.to(q.device)
    elif cu_seqlens.device != q.device:
        raise ValueError(f"{what}: cu_seqlens is on {cu_seqlens.device}; expected the CPU or q's device")
    if lens is not None and zigzag and any(n % 2 for n in lens):
        raise ValueError(f"{what}: with zigzag every local shard holds two equal chunks, so its length must be even; "
                         f"got {lens}")
    return cu_seqlens, lens


def sp_ag_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: SpAgAttentionContext,
                    causal: bool = True, zigzag: bool = True, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, scale: float | None = None, softcap: float = 0.0,
                    return_lse: bool = False, method: str = "auto", out: torch.Tensor | None = None):
    """Attention of this rank's queries over every rank's keys (module docstring); collective, no host sync.

    ``q`` [total, Hq, D], ``k`` / ``v`` [total, Hkv, D]: this rank's shard of each sequence (zig-zag: its two chunks
    in order). ``cu_seqlens`` [B + 1] int32: the local shards' prefix sums, the same on every rank (None: one
    sequence); on the CPU it is checked (even lengths for ``zigzag``) and copied to the device; on the device it is
    taken as given, with ``max_seqlen`` (the longest local shard; needed then, for the grid). ``ctx``: a
    :class:`SpAgAttentionContext` with room for ``world * total`` rows of ``2 * Hkv * D`` (``ops.sp_ag_attention``
    keeps one). ``method``: the gather's (``auto``: ``copy_engine``). Returns ``out`` [total, Hq, D] or ``(out,
    lse [total, Hq] fp32)``."""
    what = "sp_ag_attention"
    cu, lens = check_inputs(what, q, k, v, cu_seqlens, zigzag, method)
    if lens is None and max_seqlen is None:
        raise ValueError(f"{what}: cu_seqlens on the device needs max_seqlen (the longest local shard)")
    longest = max(lens) if lens is not None else int(max_seqlen)
    total, hq, d = q.shape
    hkv = k.shape[1]
    world = ctx.world.world_size
    width = 2 * hkv * d
    if ctx.k != width or ctx.dtype != q.dtype or world * total > ctx.max_m:
        raise ValueError(f"{what}: context is for {ctx.max_m} rows of {ctx.k} {ctx.dtype}, the call needs "
                         f"{world * total} rows of {width} {q.dtype}")
    out = check_out(what, out, (total, hq, d), q.dtype, q.device)
    lse = torch.empty((total, hq), dtype=torch.float32, device=q.device) if return_lse else None
    if total == 0:
        return (out, lse) if return_lse else out
    method = "copy_engine" if method == "auto" else method
    if q.stride(-1) != 1:
        q = q.contiguous()
    slots = 2 if zigzag else 1
    shard = torch.cat([k.reshape(total, hkv * d), v.reshape(total, hkv * d)], dim=1)  # one row per token
    cfg = default_config(d, q.dtype, causal)
    gathered = ctx.gathered[:world * total]
    use_tma = cfg.use_tma and not ctx.world.interpreted
    if use_tma:
        k_arg = TensorDescriptor(gathered, [world * total, hkv * d], [width, 1], [cfg.block_n, d])
        v_arg = TensorDescriptor(gathered[:, hkv * d:], [world * total, hkv * d], [width, 1], [cfg.block_n, d])
    else:
        k_arg, v_arg = gathered, gathered[:, hkv * d:]
    blocks = triton.cdiv(triton.cdiv(longest, slots), cfg.block_m)
    batch = cu.numel() - 1
    items = slots * blocks * batch * hq

    def attend(epoch, programs):
        _sp_ag_attn_kernel[(max(1, min(items, programs)),)](
            q, k_arg, v_arg, out, lse if lse is not None else out, cu, ctx.signals, epoch, batch, hq, hq // hkv,
            blocks, total, q.stride(0), q.stride(1), width, default_scale(d, scale) * LOG2E, float(softcap),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, SLOTS=slots, CAUSAL=causal, SOFTCAP=softcap > 0,
            USE_TMA=use_tma, STORE_LSE=lse is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            DOT_PRECISION=dot_precision(q.dtype))

    if world == 1:  # nothing to gather: the flag of the one chunk is raised for good (ag_gemm's context)
        gathered.copy_(shard)
        attend(ctx.epoch, ctx.num_programs)
        return (out, lse) if return_lse else out
    epoch = ctx.next_epoch()
    sig = call_signature(what, method, q.dtype, total * width, width)
    with ctx.forked():
        with ctx.side_stream():
            _agg.gather_chunks(ctx, shard, epoch, sig, method)
        attend(epoch, _agg.consumer_programs(ctx, method))
    return (out, lse) if return_lse else out


def zigzag_shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s zig-zag shard of a whole sequence ``x`` [S, ...] (S divisible by ``2 * world``): chunks
    ``rank`` and ``2*world - 1 - rank`` of ``2 * world``, concatenated."""
    c = x.shape[0] // (2 * world)
    return torch.cat([x[rank * c:(rank + 1) * c], x[(2 * world - 1 - rank) * c:(2 * world - rank) * c]])


def sp_ag_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                              zigzag: bool = True, cu_seqlens: torch.Tensor | None = None,
                              scale: float | None = None, softcap: float = 0.0):
    """fp32 ``(out, lse)`` of this rank's queries: K/V gathered with torch.distributed, each sequence rebuilt in
    global order, attention with global query positions (``_common.attention_rows_reference``)."""
    world = triton_dist.current_world()
    w, r = world.world_size, world.rank
    parts_k = [torch.empty_like(k) for _ in range(w)]
    parts_v = [torch.empty_like(v) for _ in range(w)]
    dist.all_gather(parts_k, k.contiguous(), group=world.group)
    dist.all_gather(parts_v, v.contiguous(), group=world.group)
    cu = [0, q.shape[0]] if cu_seqlens is None else cu_seqlens.tolist()
    scale = default_scale(q.shape[-1], scale)
    slots = 2 if zigzag else 1
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        c = (hi - lo) // slots
        if c == 0:
            continue
        order = [(src, s) for src in range(w) for s in range(slots)]
        chunk = {(src, s): (src if s == 0 else 2 * w - 1 - src) for src, s in order}
        ks = sorted(order, key=lambda o: chunk[o])  # global order of the chunks
        kg = torch.cat([parts_k[src][lo + s * c:lo + (s + 1) * c] for src, s in ks])
        vg = torch.cat([parts_v[src][lo + s * c:lo + (s + 1) * c] for src, s in ks])
        for s in range(slots):
            qs = q[lo + s * c:lo + (s + 1) * c]
            cq = chunk[(r, s)]
            o, l_ = attention_rows_reference(qs, kg, vg, scale=scale, softcap=softcap,
                                             causal_offset=cq * c if causal else None)
            out[lo + s * c:lo + (s + 1) * c] = o
            lse[lo + s * c:lo + (s + 1) * c] = l_
    return out, lse
