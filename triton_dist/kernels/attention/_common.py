"""Tiles and host helpers shared by the attention kernels (one place: DESIGN.md, "shared tile helpers").

Layouts follow FlashInfer / vLLM ("NHD": tokens, heads, head dim):

* decode: ``q`` [B, Hq, D]; KV contiguous ``k_cache`` / ``v_cache`` [B, T, Hkv, D], or paged [pages, page_size,
  Hkv, D] with ``block_table`` [B, max_pages] (int32 page ids) and ``kv_lens`` [B] (int32 tokens per sequence);
* prefill (varlen): ``q`` [total_q, Hq, D], ``k`` / ``v`` [total_k, Hkv, D], ``cu_seqlens`` [B + 1] (int32);
* GQA: q head ``h`` reads kv head ``h // (Hq // Hkv)``; ``Hq % Hkv == 0``.

The log-sum-exp ``lse`` of a row is ``log(sum_j exp(s_j))`` in natural log over the *scaled* (and soft-capped)
scores, fp32, ``-inf`` for a row that attends to nothing (its output is 0). Two partials over disjoint key sets merge
as ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``
(:func:`merge_partials_reference`; on the device :func:`merge_step`), which is how split-KV decoding combines its
splits and sequence-parallel decoding its ranks.

In the kernels the scores live in the base-2 domain (``exp2`` is one instruction): ``s2 = q.k * scale * log2(e)``,
so the running max ``m`` and the row sum ``l`` of :func:`attend_tile` are base 2 and :func:`finish_rows` converts the
lse back to natural log.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): natural-log scores to base 2
LN2 = 0.6931471805599453  # ln(2): base-2 lse to natural log
HEAD_DIMS = (64, 128, 256)  # head dims the kernels are built and tested for (powers of two: one tile wide)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------------- device tiles
@triton.jit
def soft_cap(s, softcap):
    """``softcap * tanh(s / softcap)`` (Gemma-2 / Grok score capping), written with ``exp`` so that it runs everywhere
    the kernels do (the CPU interpreter included); saturates to +-softcap without overflow."""
    t = tl.exp(-2.0 * tl.abs(s) / softcap)
    th = (1.0 - t) / (1.0 + t)
    return softcap * tl.where(s < 0, -th, th)


@triton.jit
def attend_tile(acc, m_i, l_i, q, k_t, v, valid, qk_scale2, softcap, SOFTCAP: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One online-softmax step of a row block over one key tile (FlashAttention-2's inner loop).

    ``q`` [M, D], ``k_t`` [D, N] (keys transposed), ``v`` [N, D] in the input dtype; ``valid`` [M, N] (or
    broadcastable) masks keys that do not exist or may not be attended (causal, length); ``acc`` [M, D] fp32 is the
    unnormalised output, ``m_i`` / ``l_i`` [M] the running base-2 max and sum. ``DOT_PRECISION``: the dots' input
    precision (``gemm.dot_precision(dtype)``: ``"ieee"`` for fp32 unless torch allows TF32; the launch option
    ``default_dot_input_precision`` did not reach these dots on an H200: fp32 came out at TF32 accuracy).
    ``qk_scale2 = scale * log2(e)``; ``SOFTCAP``: apply :func:`soft_cap` (``softcap`` in natural-log units) before
    the base change. A row with every key masked so far keeps ``m_i = -inf``, ``l_i = 0`` and ``acc = 0``. Returns the new ``(acc, m_i, l_i)``."""
    s = tl.dot(q, k_t, out_dtype=tl.float32, input_precision=DOT_PRECISION)
    if SOFTCAP:
        s = soft_cap(s * (qk_scale2 * 0.6931471805599453), softcap) * 1.4426950408889634
    else:
        s = s * qk_scale2
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp2(-inf - 0) = 0, no NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], out_dtype=tl.float32, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_rows(acc, m_i, l_i):
    """``(out, lse)`` of rows after the last :func:`attend_tile`: ``out = acc / l`` (0 where nothing was attended),
    ``lse`` in natural log (``-inf`` there)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def merge_step(acc, lse_acc, part, lse_part):
    """Fold one partial (``part`` [.., D] fp32, normalised; ``lse_part`` natural log) into the running merge
    (``acc`` normalised, ``lse_acc``); either may be empty (``-inf``). Returns ``(acc, lse)``."""
    hi = tl.maximum(lse_acc, lse_part)
    hi_use = tl.where(hi == float("-inf"), 0.0, hi)
    wa = tl.exp(lse_acc - hi_use)
    wb = tl.exp(lse_part - hi_use)
    tot = wa + wb
    tot_use = tl.where(tot == 0.0, 1.0, tot)
    acc = (acc * (wa / tot_use)[:, None] + part * (wb / tot_use)[:, None])
    lse = tl.where(tot == 0.0, float("-inf"), hi_use + tl.log(tot_use))
    return acc, lse


# ---------------------------------------------------------------------------------------------- host helpers
def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` or ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_tensor(what: str, name: str, t, ndim: int, dtypes=None, device=None, ref: str = "q") -> None:
    """A ValueError / TypeError naming ``name`` unless ``t`` is a tensor of ``ndim`` dims (of ``dtypes``, on
    ``device``: the device of tensor ``ref``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{what}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{what}: {name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device}, expected {device} (the device of {ref})")


def check_heads(what: str, hq: int, hkv: int, d: int, dk: int | None = None, dv: int | None = None) -> None:
    """Head counts and head dims of q / k / v: ``hq % hkv == 0``, the same head dim everywhere, in
    :data:`HEAD_DIMS`."""
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{what}: q has {hq} heads and k/v {hkv}; the q heads must be a multiple of the kv heads "
                         "(GQA / MQA / MHA)")
    for name, x in (("k", dk), ("v", dv)):
        if x is not None and x != d:
            raise ValueError(f"{what}: {name}'s head dim is {x}, q's is {d}; they must be equal")
    if d not in HEAD_DIMS:
        raise ValueError(f"{what}: head dim {d} is not supported; supported: {', '.join(map(str, HEAD_DIMS))}")


def gqa_repeat(x: torch.Tensor, hq: int, dim: int) -> torch.Tensor:
    """``x`` with its kv heads (dimension ``dim``) repeated to ``hq`` q heads (GQA: q head h reads kv head
    ``h // (hq // hkv)``)."""
    return x.repeat_interleave(hq // x.shape[dim], dim=dim)


def attention_rows_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, softcap: float = 0.0,
                             causal_offset: int | None = None):
    """fp32 attention of one sequence for tests and references: ``q`` [Tq, Hq, D], ``k`` / ``v`` [Tk, Hkv, D] ->
    ``(out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32, natural log)``. ``causal_offset``: query i attends keys ``j <= i +
    causal_offset`` (``Tk - Tq`` for bottom-right causal, as in decoding and chunked prefill); None: every key. Rows
    with no key: out 0, lse -inf."""
    hq = q.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Tq, D]
    kf = gqa_repeat(k.float(), hq, 1).transpose(0, 1)
    vf = gqa_repeat(v.float(), hq, 1).transpose(0, 1)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Tq, Tk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal_offset is not None:
        tq, tk = q.shape[0], k.shape[0]
        keep = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + causal_offset
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is attended
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(p, vf)
    return out.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous()


def merge_partials_reference(outs: torch.Tensor, lses: torch.Tensor, dim: int = 0):
    """Merge partial attention results over disjoint key sets along ``dim``: ``outs`` [..., P, ..., D] (normalised),
    ``lses`` the same without D (natural log, -inf for an empty part) -> ``(out, lse)`` in fp32. All parts empty:
    out 0, lse -inf."""
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=dim)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - safe.unsqueeze(dim))  # 0 for empty parts; all-empty: 0
    out = (outs.float() * w.unsqueeze(-1)).sum(dim=dim)
    return out, lse


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))
