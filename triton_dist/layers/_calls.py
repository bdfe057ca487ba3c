"""The ops the layers call, in one place: :mod:`triton_dist.ops` and :mod:`triton_dist.kernels.decoder` directly (the
default), or their ``torch.library`` registrations (:func:`use_registered_ops`: ``torch.ops.triton_dist.*``, opaque
to ``torch.compile``, so a whole model compiles with ``fullgraph=True``). Both run the same kernels."""
from __future__ import annotations

import torch

_STATE = {"registered": False}


def use_registered_ops(on: bool = True) -> None:
    """Make the layers call ``torch.ops.triton_dist.*`` (``import triton_dist.library``) instead of the Python
    functions, so ``torch.compile`` traces models through them; ``False``: back to direct calls."""
    if on:
        import triton_dist.library  # noqa: F401  (registers the ops)
    _STATE["registered"] = bool(on)


def registered() -> bool:
    return _STATE["registered"]


def _lib():
    return torch.ops.triton_dist


def ag_gemm(a, b):
    from triton_dist import ops
    return _lib().ag_gemm(a, b) if registered() else ops.ag_gemm(a, b)


def gemm_rs(a, b):
    from triton_dist import ops
    return _lib().gemm_rs(a, b) if registered() else ops.gemm_rs(a, b)


def gemm_ar(a, b):
    from triton_dist import ops
    return _lib().gemm_ar(a, b) if registered() else ops.gemm_ar(a, b)


def all_reduce(x):
    from triton_dist import ops
    return _lib().all_reduce(x) if registered() else ops.all_reduce(x)


def all_gather(x):
    from triton_dist import ops
    return _lib().all_gather(x) if registered() else ops.all_gather(x)


def decode_gemm(a, b):
    from triton_dist.kernels import decode_gemm as _dg
    return _lib().decode_gemm(a, b) if registered() else _dg.decode_gemm(a, b)


def flash_attn(q, k, v, *, causal: bool, scale: float):
    from triton_dist import ops
    if registered():
        return _lib().flash_attn(q, k, v, causal=causal, scale=scale)
    return ops.flash_attn(q, k, v, causal=causal, scale=scale)


def flash_decode(q, k_cache, v_cache, kv_lens, block_table, *, scale: float):
    from triton_dist import ops
    if registered():
        return _lib().flash_decode(q, k_cache, v_cache, kv_lens, block_table, scale=scale)
    return ops.flash_decode(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale)


def add_rmsnorm(x, weight, eps: float, residual):
    """``(norm(s), s)``, ``s = x + residual`` (``x`` when ``residual`` is None)."""
    from triton_dist.kernels import decoder
    if not registered():
        return decoder.add_rmsnorm(x, weight, eps, residual)
    if residual is None:
        return _lib().rmsnorm(x, weight, eps), x
    return _lib().add_rmsnorm(x, residual, weight, eps)


def silu_mul(x):
    from triton_dist.kernels import decoder
    return _lib().silu_mul(x) if registered() else decoder.silu_mul(x)


def qk_norm_rope_cache(qkv, positions, inv_freq, k_cache, v_cache, *, num_heads, num_kv_heads, seq, q_norm, k_norm,
                       eps, block_table, return_kv: bool):
    """q (and with ``return_kv`` ``(q, k, v)``); k / v written into the caches."""
    from triton_dist.kernels import decoder
    if registered():
        q, k, v = _lib().qk_norm_rope_cache(qkv, positions, inv_freq, k_cache, v_cache, q_norm, k_norm, block_table,
                                            num_heads=num_heads, num_kv_heads=num_kv_heads, seq=seq, eps=eps)
        return (q, k, v) if return_kv else q
    return decoder.qk_norm_rope_cache(qkv, positions, inv_freq, k_cache, v_cache, num_heads=num_heads,
                                      num_kv_heads=num_kv_heads, seq=seq, q_norm=q_norm, k_norm=k_norm, eps=eps,
                                      block_table=block_table, return_kv=return_kv)


def tp_moe_ag_rs(x, w1, w2, ids, wts):
    """ag_moe, SiLU * up, moe_rs (sequence-sharded tokens)."""
    from triton_dist import ops
    return _lib().tp_moe_ag_rs(x, w1, w2, ids, wts) if registered() else ops.tp_moe_ag_rs(x, w1, w2, ids, wts)


def tp_moe_ar(x, w1, w2, ids, wts):
    """moe_plan, moe_gemm, SiLU * up, moe_ar (replicated tokens; nothing reduced at one rank)."""
    from triton_dist import ops
    return _lib().tp_moe_ar(x, w1, w2, ids, wts) if registered() else ops.tp_moe_ar(x, w1, w2, ids, wts)


def ep_moe_dispatched(x, w13, w2, ids, wts, num_experts: int):
    """EPMoE on token shards: dispatch, the local experts, combine."""
    if registered():
        return _lib().ep_moe_dispatched(x, w13, w2, ids, wts, num_experts=num_experts)
    from triton_dist.kernels.moe import ep_moe
    return ep_moe.ep_moe_dispatched(x, w13, w2, ids, wts, num_experts)


def ep_moe_local(x, w13, w2, ids, wts, first: int):
    """EPMoE on replicated tokens: this rank's experts' fp32 partial (the caller all-reduces)."""
    if registered():
        return _lib().ep_moe_local(x, w13, w2, ids, wts, first=first)
    from triton_dist.kernels.moe import ep_moe
    return ep_moe.ep_moe_local(x, w13, w2, ids, wts, first)
