"""Collectives, overlapped GEMMs and attention on torch tensors: ``from triton_dist import ops``.

Each op takes and returns torch tensors and keeps one context per (op, dtype) (GEMMs: per (op, K, N, dtype)) that
owns its symmetric buffers; the first call with a larger size replaces the context (collective: every rank calls
the ops in the same order with the same shapes, as with torch.distributed). After that first call an op allocates
nothing on the symmetric heap and never syncs with the host, so it can be captured in a CUDA graph.
``method="auto"`` picks by size and world; a method name forces one.

=========================  ============================  ===============================================
op                         shards                        methods
=========================  ============================  ===============================================
``all_reduce(x)``          x: any shape -> same shape     ``ll``, ``one_shot``, ``push_one_shot`` (latency),
                                                          ``two_shot``, ``push_two_shot`` (bandwidth)
``all_gather(x)``          (m, ...) -> (world*m, ...)     ``ll``, ``pull``, ``push``, ``ring``, ``copy_engine``
``reduce_scatter(x)``      (world*m, ...) -> (m, ...)     ``full_mesh``, ``push``, ``ring`` (fp32 partials)
``all_to_all(x)``          (world*m, ...) -> same         equal splits: ``kernel``, ``copy_engine``
``all_to_all_v(x, i, o)``  rows split by i -> rows by o   variable splits
``ag_gemm(a, b)``          a: (m, K), b: (K, N)           ``copy_engine``, ``sm``, ``sequential``
                           -> all_gather(a) @ b: (world*m, N)
``gemm_rs(a, b)``          a: (M, K_loc), b: (K_loc, N)   ``fused``, ``sequential_reduce``, ``decomposed``,
                                                          ``sequential``
                           -> rows of rank of sum(a@b): (M/world, N)
``gemm_ar(a, b)``          a: (M, K_loc), b: (K_loc, N)   ``fused``, ``sequential`` (M <= a few hundred)
                           -> sum(a@b): (M, N)
``flash_decode(q, ...)``   q (B, Hq, D), KV cache         local: split-KV decode, contiguous or paged KV
``flash_attn(q, k, v)``    (B, T, H, D); ``_varlen``      local: prefill attention (causal or not, lse)
``sp_flash_decode(q,..)``  KV sequence sharded            local partials, LL all-gather, LSE merge
``sp_ag_attention(q,..)``  sequence sharded (zig-zag)   K/V all-gather overlapped with the attention:
                           -> this rank's queries         ``copy_engine``, ``sm``
``ulysses_pre_attn(..)``   (S/W, H, D) -> (S, H/W, D)     all-to-all; GQA-aware kv head placement
``ulysses_post_attn(o)``   (S, H/W, D) -> (S/W, H, D)     all-to-all
``ulysses_qkv_pre_attn``   x (S/W, hidden) @ w_qkv.t()    the projection overlapped with the all-to-all
``ulysses_post_attn_o``    o (S, H/W, D) -> @ w_o.t()     the all-to-all overlapped with the O projection
``ag_moe(x, w1, ids, wts)``  x (T/W, H), w1 (E, H, N_loc)  token all-gather overlapped with the grouped GEMM:
                           -> (h (T*k, N_loc), plan)      ``copy_engine``, ``sm``
``moe_rs(h, w2, plan)``    h (T*k, I_loc) -> (T/W, H)     grouped GEMM, top-k sum, reduce-scatter
``moe_ar(h, w2, plan)``    h (T*k, I_loc) -> (T, H)       grouped GEMM, top-k sum, all-reduce (decode)
``a2a_gemm(x, w, s, r)``   rows split by s -> (r, N)      all_to_all_single overlapped with the GEMM @ w
=========================  ============================  ===============================================
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .kernels import ag_gemm as _ag_gemm
from .kernels import all_gather as _ag
from .kernels import all_reduce as _ar
from .kernels import all_to_all as _a2a
from .kernels import gemm_ar as _gemm_ar
from .kernels import gemm_rs as _gemm_rs
from .kernels import reduce_scatter as _rs
from .kernels.attention import flash_attn as _fa
from .kernels.attention import flash_decode as _fd
from .kernels.attention import sp_ag_attention as _spa
from .kernels.attention import sp_flash_decode as _spd
from .kernels.attention import ulysses as _uly
from .kernels.moe import a2a_gemm as _a2ag
from .kernels.moe import tp_moe as _tpm
from .kernels.gemm import check_method as _check_method
from .kernels.gemm import check_operands as _gemm_check
from .kernels.gemm import check_out as _check_out
from .runtime.errors import CallMismatch
from .runtime.world import current_world

_contexts: dict = {}


def _context(op: str, cls, numel: int, dtype: torch.dtype):
    key = (op, dtype)
    ctx = _contexts.get(key)
    if ctx is None or ctx.max_numel < numel:
        if ctx is not None:
            ctx.close()
        capacity = 1 << max(12, (max(numel, 1) - 1).bit_length())  # powers of two: few re-allocations
        ctx = _contexts[key] = cls(capacity, dtype)
    return ctx


def _gemm_context(op: str, cls, m: int, k: int, n: int, dtype: torch.dtype):
    """The cached context of a GEMM op for (K, N, dtype), with room for at least ``m`` rows (a power of two)."""
    key = (op, k, n, dtype)
    ctx = _contexts.get(key)
    if ctx is None or ctx.max_m < m:
        if ctx is not None:
            ctx.close()
        ctx = _contexts[key] = cls(1 << max(4, (max(m, 1) - 1).bit_length()), k, n, dtype)
    return ctx


def _gemm_shapes(what: str, a, b, method: str, methods):
    """(M, K, N) of ``a @ b`` after the input and method checks (before any context is made for them)."""
    _gemm_check(what, a, b)
    _check_method(what, method, methods)
    return a.shape[0], a.shape[1], b.shape[1]


def _tensor(what: str, x) -> torch.Tensor:
    """``x`` itself when it is a tensor; a clear TypeError before any (collective) context is made otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor on this rank's device, got {type(x).__name__}")
    return x


def _agree(what: str, **call) -> None:
    """With ``TRITON_DIST_DEBUG=1``: every rank's call of this op must be the same (op, shapes, dtype, method, ...);
    otherwise raise :class:`CallMismatch` on every rank, naming the ranks and both calls. A host all-gather per call,
    so debug runs only (the device-side checks are always on)."""
    world = current_world()
    if not world.config.debug or world.world_size == 1:
        return
    mine = (what, sorted((k, str(v)) for k, v in call.items()))
    every = [None] * world.world_size
    dist.all_gather_object(every, mine, group=world.group)
    differ = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        def fmt(c):
            return f"{c[0]}({', '.join(f'{k}={v}' for k, v in c[1])})"
        raise CallMismatch(f"{what}: the ranks' calls differ (TRITON_DIST_DEBUG check): rank 0 called {fmt(every[0])}; "
                           + "; ".join(f"rank {r} called {fmt(every[r])}" for r in differ)
                           + ". Every rank must call the same ops, in the same order, with the same shapes, dtypes "
                             "and methods.")


def _agree_splits(ins, outs) -> None:
    """With ``TRITON_DIST_DEBUG=1``: all_to_all_v's split tables agree (what rank i sends j is what j expects)."""
    world = current_world()
    if not world.config.debug or world.world_size == 1:
        return
    every = [None] * world.world_size
    dist.all_gather_object(every, ([int(s) for s in ins], [int(s) for s in outs]), group=world.group)
    bad = [(i, j) for i in range(world.world_size) for j in range(world.world_size) if every[i][0][j] != every[j][1][i]]
    if bad:
        raise CallMismatch("all_to_all_v: the split tables disagree (TRITON_DIST_DEBUG check): " + "; ".join(
            f"rank {i} sends {every[i][0][j]} rows to rank {j}, which expects {every[j][1][i]}" for i, j in bad[:8])
            + ". input_split_sizes[j] of rank i must equal output_split_sizes[i] of rank j.")


def _shape(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"


def cached_contexts() -> dict:
    """The ops' cached contexts now, by key: a CUDA graph captured with them stays valid while each is still the
    cached one (a larger call replaces a context and frees its buffers)."""
    return dict(_contexts)


def release_contexts() -> None:
    """Free every cached context's symmetric buffers (collective, like the ops)."""
    for ctx in _contexts.values():
        ctx.close()
    _contexts.clear()
    _a2a.close_default_context()


def all_reduce(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over all ranks (fp32 accumulation for bf16/fp16); see :mod:`triton_dist.kernels.all_reduce`."""
    _agree("all_reduce", x=_shape(_tensor("all_reduce", x)), method=method)
    slots = current_world().world_size if method == "push_one_shot" else 1  # one staging slot per rank
    ctx = _context("all_reduce", _ar.AllReduceContext, slots * x.numel(), x.dtype)
    return _ar.all_reduce(x, ctx=ctx, method=method, out=out)


def all_gather(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank's ``x`` stacked along dim 0 in rank order; see :mod:`triton_dist.kernels.all_gather`."""
    _agree("all_gather", x=_shape(_tensor("all_gather", x)), method=method)
    ctx = _context("all_gather", _ag.AllGatherContext, x.numel(), x.dtype)
    return _ag.all_gather(x, ctx=ctx, method=method, out=out)


def reduce_scatter(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ``rank`` (along dim 0) of the sum of ``x`` over ranks; see :mod:`triton_dist.kernels.reduce_scatter`."""
    _agree("reduce_scatter", x=_shape(_tensor("reduce_scatter", x)), method=method)
    ctx = _context("reduce_scatter", _rs.ReduceScatterContext, x.numel(), x.dtype)
    return _rs.reduce_scatter(x, ctx=ctx, method=method, out=out)


def all_to_all(x: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 (``all_to_all_single`` semantics), ``method`` ``kernel`` or
    ``copy_engine``; see :mod:`triton_dist.kernels.all_to_all`."""
    _agree("all_to_all", x=_shape(_tensor("all_to_all", x)), method=method)
    return _a2a.all_to_all(x, out=out, method=method)


def all_to_all_v(x: torch.Tensor, input_split_sizes, output_split_sizes, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Variable-split all-to-all along dim 0 (``all_to_all_single`` with split sizes)."""
    _agree("all_to_all_v", rows=f"{tuple(_tensor('all_to_all_v', x).shape[1:])} {x.dtype}")
    _agree_splits(input_split_sizes, output_split_sizes)
    return _a2a.all_to_all_v(x, input_split_sizes, output_split_sizes, out=out)


def ag_gemm(a: torch.Tensor, b: torch.Tensor, *, method: str = "auto", return_gathered: bool = False,
            out: torch.Tensor | None = None):
    """``all_gather(a) @ b`` with the gather overlapped with the GEMM: ``a`` is this rank's ``(m, K)`` rows of A,
    ``b`` its ``(K, N)`` (any strides); returns ``(world*m, N)``, and the gathered A as well with
    ``return_gathered`` (a view valid until the next ``ag_gemm`` call with the same K, N and dtype). See
    :mod:`triton_dist.kernels.ag_gemm`."""
    m, k, n = _gemm_shapes("ag_gemm", a, b, method, _ag_gemm.METHODS)
    _agree("ag_gemm", a=_shape(a), b=_shape(b), method=method)
    ctx = _gemm_context("ag_gemm", _ag_gemm.AGGemmContext, current_world().world_size * m, k, n, a.dtype)
    return _ag_gemm.ag_gemm(a, b, ctx=ctx, method=method, return_gathered=return_gathered, out=out)


def gemm_rs(a: torch.Tensor, b: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None):
    """This rank's rows (``M/world``) of ``sum over ranks of a @ b`` with the reduce-scatter fused into the GEMM;
    ``a`` is ``(M, K_loc)``, ``b`` ``(K_loc, N)``. See :mod:`triton_dist.kernels.gemm_rs`."""
    m, k, n = _gemm_shapes("gemm_rs", a, b, method, _gemm_rs.METHODS)
    _agree("gemm_rs", a=_shape(a), b=_shape(b), method=method)
    if m % current_world().world_size:
        raise ValueError(f"gemm_rs: rows of a ({m}) must be a multiple of the world size "
                         f"{current_world().world_size}")
    ctx = _gemm_context("gemm_rs", _gemm_rs.GemmRSContext, m, k, n, a.dtype)
    return _gemm_rs.gemm_rs(a, b, ctx=ctx, method=method, out=out)


def gemm_ar(a: torch.Tensor, b: torch.Tensor, *, method: str = "auto", out: torch.Tensor | None = None):
    """``sum over ranks of a @ b`` (``(M, N)``, identical on every rank), for decode shapes. ``method="fused"``: one
    kernel (GEMM tiles pushed to every rank, summed in rank order); ``"sequential"``: torch.matmul then
    :func:`all_reduce`, which ``"auto"`` picks (faster at every measured M so far, docs/perf/NOTES.md). See
    :mod:`triton_dist.kernels.gemm_ar`."""
    m, k, n = _gemm_shapes("gemm_ar", a, b, method, _gemm_ar.METHODS)
    _agree("gemm_ar", a=_shape(a), b=_shape(b), method=method)
    if method == "sequential" or (method == "auto" and _gemm_ar.pick_method(m) == "sequential"):
        return all_reduce(torch.matmul(a, b), out=_check_out("gemm_ar", out, (m, n), a.dtype, a.device))
    ctx = _gemm_context("gemm_ar", _gemm_ar.GemmARContext, m, k, n, a.dtype)
    return _gemm_ar.gemm_ar(a, b, ctx=ctx, method=method, out=out)


# ------------------------------------------------------------------------------------------------ attention
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                 block_table: torch.Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
                 return_lse: bool = False, out: torch.Tensor | None = None):
    """Decode attention of ``q`` [B, Hq, D] over each sequence's ``kv_lens[b]`` cached keys (contiguous [B, T, Hkv,
    D] or paged with ``block_table``), split over the KV sequence and merged by log-sum-exp; local, no
    communication. See :mod:`triton_dist.kernels.attention.flash_decode`."""
    return _fd.flash_decode(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale, softcap=softcap,
                            return_lse=return_lse, out=out)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
               scale: float | None = None, softcap: float = 0.0, return_lse: bool = False,
               out: torch.Tensor | None = None):
    """Prefill attention, q [B, Tq, Hq, D], k / v [B, Tk, Hkv, D]; local. See
    :mod:`triton_dist.kernels.attention.flash_attn`."""
    return _fa.flash_attn(q, k, v, causal=causal, scale=scale, softcap=softcap, return_lse=return_lse, out=out)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                      scale: float | None = None, softcap: float = 0.0, return_lse: bool = False,
                      out: torch.Tensor | None = None):
    """Prefill attention over packed sequences (q [total_q, Hq, D], k / v [total_k, Hkv, D], ``cu_seqlens``
    prefix sums); local. See :mod:`triton_dist.kernels.attention.flash_attn`."""
    return _fa.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                 max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, softcap=softcap,
                                 return_lse=return_lse, out=out)


def sp_flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                    block_table: torch.Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
                    return_lse: bool = False, method: str = "auto", out: torch.Tensor | None = None):
    """Decode attention over the KV sequence sharded across the ranks (each rank: the same ``q``, its own cache and
    ``kv_lens``); the same result on every rank. Collective. See
    :mod:`triton_dist.kernels.attention.sp_flash_decode`."""
    numel = _spd.packed_numel(q)  # checks q first
    _agree("sp_flash_decode", q=_shape(q), method=method, lse=return_lse)
    ctx = _context("sp_flash_decode", _ag.AllGatherContext, numel, torch.float32)
    return _spd.sp_flash_decode(q, k_cache, v_cache, kv_lens, ctx=ctx, block_table=block_table, scale=scale,
                                softcap=softcap, return_lse=return_lse, method=method, out=out)


sp_flash_decode_reference = _spd.sp_flash_decode_reference


def ulysses_pre_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str = "auto"):
    """Sequence-sharded q / k / v ``[S/W, H, D]`` -> head-sharded over the whole sequence ``[S, H/W, D]`` (kv heads
    placed for GQA). Collective. See :mod:`triton_dist.kernels.attention.ulysses`."""
    _agree("ulysses_pre_attn", q=_shape(_tensor("ulysses_pre_attn", q)), k=_shape(k), method=method)
    return _uly.ulysses_pre_attn(q, k, v, method=method)


def ulysses_post_attn(o: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """Head-sharded attention output ``[S, H/W, D]`` -> this rank's tokens with every head ``[S/W, H, D]``.
    Collective. See :mod:`triton_dist.kernels.attention.ulysses`."""
    _agree("ulysses_post_attn", o=_shape(_tensor("ulysses_post_attn", o)), method=method)
    return _uly.ulysses_post_attn(o, method=method)


def sp_ag_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, zigzag: bool = True,
                    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                    scale: float | None = None, softcap: float = 0.0, return_lse: bool = False,
                    method: str = "auto", out: torch.Tensor | None = None):
    """Sequence-parallel prefill attention: this rank's shard of q / k / v (``[total, H, D]``; zig-zag chunks ``r``
    and ``2W-1-r`` of each sequence with ``zigzag``), K/V all-gathered while the attention runs; returns this rank's
    queries' output. Collective. See :mod:`triton_dist.kernels.attention.sp_ag_attention`."""
    what = "sp_ag_attention"
    _spa.check_inputs(what, q, k, v, cu_seqlens, zigzag, method)
    _agree(what, q=_shape(q), k=_shape(k), causal=causal, zigzag=zigzag, method=method)
    world = current_world().world_size
    ctx = _gemm_context(what, _spa.SpAgAttentionContext, world * q.shape[0], 2 * k.shape[1] * k.shape[2], 1, q.dtype)
    return _spa.sp_ag_attention(q, k, v, ctx=ctx, causal=causal, zigzag=zigzag, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, scale=scale, softcap=softcap, return_lse=return_lse,
                                method=method, out=out)


sp_ag_attention_reference = _spa.sp_ag_attention_reference


def ulysses_qkv_pre_attn(x: torch.Tensor, w_qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                         chunks: int = 4, method: str = "auto"):
    """The QKV projection ``x @ w_qkv.t()`` (fused ``nn.Linear`` weight, q | k | v rows) followed by
    :func:`ulysses_pre_attn`, pipelined over ``chunks`` token groups so the projection overlaps the all-to-all.
    Collective. See :mod:`triton_dist.kernels.attention.ulysses`."""
    _agree("ulysses_qkv_pre_attn", x=_shape(_tensor("ulysses_qkv_pre_attn", x)), w=_shape(w_qkv), chunks=chunks,
           method=method)
    return _uly.ulysses_qkv_pre_attn(x, w_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads, chunks=chunks,
                                     method=method)


def ulysses_post_attn_o(o: torch.Tensor, w_o: torch.Tensor, *, chunks: int = 4, method: str = "auto"):
    """:func:`ulysses_post_attn` followed by the O projection ``@ w_o.t()`` (``nn.Linear`` weight ``[hidden, Hq *
    D]``), pipelined over ``chunks`` token groups so the all-to-all overlaps the projection: ``[S/W, hidden]``.
    Collective. See :mod:`triton_dist.kernels.attention.ulysses`."""
    _agree("ulysses_post_attn_o", o=_shape(_tensor("ulysses_post_attn_o", o)), w=_shape(w_o), chunks=chunks,
           method=method)
    return _uly.ulysses_post_attn_o(o, w_o, chunks=chunks, method=method)


def ag_moe(x: torch.Tensor, w1: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
           method: str = "copy_engine"):
    """Tensor-parallel MoE up-projection: every rank's tokens all-gathered while the grouped GEMM of their (token,
    slot) pairs with this rank's expert slices ``w1`` [E, H, N_loc] runs; returns ``(h [T*k, N_loc], plan)`` (rows
    in the plan's order, for :func:`moe_rs`). Collective. See :mod:`triton_dist.kernels.moe.tp_moe`."""
    what = "ag_moe"
    _tpm.check_inputs(what, x, w1, topk_ids, topk_weights, method)
    _agree(what, x=_shape(x), w1=_shape(w1), topk=topk_ids.shape[1], method=method)
    world = current_world().world_size
    ctx = _gemm_context(what, _tpm.AgMoEContext, world * x.shape[0], x.shape[1], 1, x.dtype)
    meta = _context("ag_moe_meta", _ag.AllGatherContext, 2 * topk_ids.numel(), torch.float32) if world > 1 else None
    return _tpm.ag_moe(x, w1, topk_ids, topk_weights, ctx=ctx, meta_ctx=meta, method=method)


def moe_plan(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> _tpm.MoEPlan:
    """The routing plan of tokens held by every rank (decode, for :func:`moe_gemm` then :func:`moe_ar`); local."""
    return _tpm.moe_plan(topk_ids, topk_weights, num_experts)


moe_gemm = _tpm.moe_gemm


def moe_rs(h: torch.Tensor, w2: torch.Tensor, plan: _tpm.MoEPlan) -> torch.Tensor:
    """Tensor-parallel MoE down-projection of :func:`ag_moe`'s activated rows, the top-k weighted sum and the
    reduce-scatter to the tokens' ranks: ``[T/W, H]``. Collective. See :mod:`triton_dist.kernels.moe.tp_moe`."""
    _agree("moe_rs", h=_shape(_tensor("moe_rs", h)), w2=_shape(w2))
    tokens = plan.sources * plan.tokens_per_source
    ctx = _gemm_context("moe_rs", _tpm.MoERSContext, tokens, w2.shape[1], w2.shape[2], h.dtype) \
        if current_world().world_size > 1 else None
    return _tpm.moe_rs(h, w2, plan, ctx=ctx)


def moe_ar(h: torch.Tensor, w2: torch.Tensor, plan: _tpm.MoEPlan) -> torch.Tensor:
    """:func:`moe_rs` ending in an all-reduce (decode, tokens replicated: a :func:`moe_plan`): ``[T, H]`` on every
    rank. Collective. See :mod:`triton_dist.kernels.moe.tp_moe`."""
    _agree("moe_ar", h=_shape(_tensor("moe_ar", h)), w2=_shape(w2))
    tokens = plan.sources * plan.tokens_per_source
    ctx = _context("moe_ar", _ar.AllReduceContext, tokens * w2.shape[2], torch.float32) \
        if current_world().world_size > 1 else None
    return _tpm.moe_ar(h, w2, plan, ctx=ctx)


def tp_moe_ag_rs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, *, method: str = "copy_engine") -> torch.Tensor:
    """A tensor-parallel MoE block on sequence-sharded tokens ``x`` [T/W, H]: :func:`ag_moe` (``w1`` [E, H, 2*I_loc]:
    gate columns, then up), ``silu(gate) * up`` (one kernel), :func:`moe_rs` (``w2`` [E, I_loc, H]): [T/W, H].
    Collective."""
    from .kernels.decoder import silu_mul
    h, plan = ag_moe(x.contiguous(), w1, topk_ids, topk_weights, method=method)
    return moe_rs(silu_mul(h), w2, plan)


def tp_moe_ar(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel MoE block on tokens replicated on every rank (decode), ``x`` [T, H]: :func:`moe_plan`,
    :func:`moe_gemm`, ``silu(gate) * up``, :func:`moe_ar`: [T, H]. Collective; at one rank (or without a world)
    local, nothing reduced."""
    from .kernels.decoder import silu_mul
    from .runtime.world import is_initialized
    plan = moe_plan(topk_ids, topk_weights, w1.shape[0])
    h = silu_mul(moe_gemm(x.contiguous(), w1, plan))
    if not is_initialized() or current_world().world_size == 1:
        return _tpm.moe_ar(h, w2, plan, ctx=None)
    return moe_ar(h, w2, plan)


ag_moe_reference = _tpm.ag_moe_reference
moe_rs_reference = _tpm.moe_rs_reference
moe_ar_reference = _tpm.moe_ar_reference


def a2a_gemm(x: torch.Tensor, w: torch.Tensor, in_splits, out_rows: int, *, ctx: _a2ag.A2AGemmContext) -> torch.Tensor:
    """``all_to_all_single(x, in_splits) @ w`` (``[out_rows, N]``), the GEMM on each source rank's rows as they
    land. ``ctx``: a :class:`triton_dist.moe.A2AGemmContext` (made collectively, with capacities every rank agrees
    on: the row counts differ by rank, so no cached context is made here). Collective. See
    :mod:`triton_dist.kernels.moe.a2a_gemm`."""
    _agree("a2a_gemm", k=_tensor("a2a_gemm", x).shape[-1], dtype=x.dtype)  # the rows differ by rank
    return _a2ag.a2a_gemm(x, w, in_splits, out_rows, ctx=ctx)


a2a_gemm_reference = _a2ag.a2a_gemm_reference
