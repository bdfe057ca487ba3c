"""Expert-parallel MoE compute on one rank's ``E / W`` whole experts (what :class:`triton_dist.layers.EPMoE` runs):

* :func:`ep_moe_dispatched` (sequence-sharded tokens): this rank's tokens sent to their experts' ranks by the EP
  normal dispatch (:class:`~.ep_normal.EPNormalContext`: rows packed by expert at the receiver, so the grouped GEMMs
  read them with the receive offsets), gate | up GEMM, SiLU * up, down GEMM, and the combine back to each token's
  rank, summed there in fp32 with the routing weights. One context per shape serves every layer (:func:`ep_context`).
* :func:`ep_moe_local` (tokens replicated on every rank): the pairs routed to this rank's experts only (the others
  go to an extra group the GEMM skips, their rows zero), their top-k weighted sum: this rank's fp32 partial of every
  token's output, which the caller all-reduces.

``w13`` [L, 2 I, H] (gate rows, then up rows: the layer's ``gate_up_proj``), ``w2`` [L, H, I] (``down_proj``); ``ids``
/ ``wts`` [T, k] global expert ids and their weights.
"""
from __future__ import annotations

import torch

from triton_dist.kernels.decoder import silu_mul
from triton_dist.kernels.moe.tp_moe import launch_moe_gemm
from triton_dist.kernels.routing import build_routing, scatter_combine

_EP_CONTEXTS: dict = {}


def ep_context(tokens: int, hidden: int, topk: int, experts: int, dtype):
    """The EP normal context shared by every layer of a shape, for at least ``tokens`` tokens per rank (a power of
    two; a larger call replaces it: collective, outside CUDA-graph capture)."""
    from triton_dist import moe
    key = (hidden, topk, experts, dtype)
    ctx = _EP_CONTEXTS.get(key)
    if ctx is None or ctx.max_tokens < tokens:
        if ctx is not None:
            ctx.close()
        ctx = _EP_CONTEXTS[key] = moe.EPNormalContext(1 << max(4, (tokens - 1).bit_length()), hidden, topk, experts,
                                                      dtype)
    return ctx


def release_ep_contexts() -> None:
    """Close the shared EP contexts (collective)."""
    for ctx in _EP_CONTEXTS.values():
        ctx.close()
    _EP_CONTEXTS.clear()


def _grouped_rows(rows, w, offsets, groups: int, n_rows: int, out, gather_index=None):
    """``out[r] = rows[r or gather_index[r]] @ w[group of r]`` over ``groups`` groups of ``offsets``."""
    if n_rows and w.shape[2]:
        launch_moe_gemm(rows, w, out, offsets, gather_index, groups, n_rows, gather_index is not None, None)
    return out


def _experts(rows, w13, w2, offsets, groups: int, n_rows: int, gather_index=None, zero: bool = False):
    """The local experts' SwiGLU on grouped rows: [n_rows, H] (rows outside the groups zero with ``zero``)."""
    alloc = torch.zeros if zero else torch.empty
    h = alloc((n_rows, w13.shape[1]), dtype=rows.dtype, device=rows.device)
    _grouped_rows(rows, w13.transpose(1, 2), offsets, groups, n_rows, h, gather_index)
    y = alloc((n_rows, w2.shape[1]), dtype=rows.dtype, device=rows.device)
    return _grouped_rows(silu_mul(h), w2.transpose(1, 2), offsets, groups, n_rows, y)


def ep_moe_dispatched(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor,
                      num_experts: int) -> torch.Tensor:
    """This rank's tokens ``x`` [T, H] through their experts on every rank: [T, H] in ``x``'s dtype. Collective."""
    ctx = ep_context(x.shape[0], x.shape[1], ids.shape[1], num_experts, x.dtype)
    recv, offs, handle = ctx.dispatch(x.contiguous(), ids)
    y = _experts(recv, w13, w2, offs, w13.shape[0], recv.shape[0])
    return ctx.combine(y, ids, wts.float(), handle)


def ep_moe_local(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor,
                 first: int) -> torch.Tensor:
    """This rank's fp32 partial [T, H] of every (replicated) token's output: the pairs of experts ``first ..
    first + L - 1`` only. Local."""
    n = w13.shape[0]
    local = (ids >= first) & (ids < first + n)
    r = build_routing(torch.where(local, ids - first, n), n + 1, check_ids=False)  # group n: never computed
    y = _experts(x.contiguous(), w13, w2, r.expert_offsets[:n + 1], n, r.num_rows, r.gather_index, zero=True)
    return scatter_combine(y, r, torch.where(local, wts.float(), 0.0), out_dtype=torch.float32)
