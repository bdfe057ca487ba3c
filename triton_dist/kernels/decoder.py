"""The small kernels of a decoder layer, fused: what sits between the GEMMs and the attention of a decode step.

A Qwen3 decode step at batch 1 spends more time in these than in reading its weights when they run as torch ops
(measured on an H200: 9.5 ms for a 3.4 ms weight read, ~1700 elementwise kernels of 1-3 us each; ``docs/perf/NOTES.md``,
"Layers, models and the engine"). Three kernels replace them:

* :func:`add_rmsnorm`: ``s = x + residual`` (rounded to the dtype, the new residual) and ``rmsnorm(s) * weight``, one
  program per row;
* :func:`qk_norm_rope_cache`: the fused QKV projection's output split into heads, q and k RMS-normalised per head
  (Qwen3's ``q_norm`` / ``k_norm``; optional), rotated (rotary embedding from the positions and the inverse
  frequencies), k and v stored into the KV cache (contiguous or paged), q (and for a prefill k, v) returned; one program
  per (token, head);
* :func:`silu_mul`: ``silu(gate) * up`` of a fused gate | up row.

Numerics follow Hugging Face's torch code step by step in the input dtype (each torch op rounds: the add, the cast
after the fp32 statistics, the weight product; ``q * cos``, ``rotate_half(q) * sin`` and their sum, with cos / sin
rounded to the dtype first), so bf16 results match torch's to the rounding of the fp32 reductions. References:
:func:`add_rmsnorm_reference`, :func:`qk_norm_rope_cache_reference`, :func:`silu_mul_reference` (torch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(what: str, name: str, t, dims: int, dtype=None):
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        got = f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: {name} must be a {dims}-D tensor, got {got}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what}: {name} must be {dtype}, got {t.dtype}")
    if t.dtype.is_floating_point and t.dtype not in DTYPES:
        raise ValueError(f"{what}: {name} must be bf16, fp16 or fp32, got {t.dtype}")


# ---------------------------------------------------------------------------------------------- add + RMSNorm
@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, stride_x, stride_r, stride_o, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, 0) / N + eps)
    n = (hf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * n).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``(rmsnorm(s) * weight, s)`` with ``s = x + residual`` (``x`` when ``residual`` is None, then returned as
    is): ``x`` / ``residual`` [T, N] with unit-stride rows, ``weight`` [N], one dtype; N up to 65536."""
    what = "add_rmsnorm"
    _check(what, "x", x, 2)
    _check(what, "weight", weight, 1, x.dtype)
    t, n = x.shape
    if weight.shape[0] != n or x.stride(1) != 1:
        raise ValueError(f"{what}: expected x [T, {weight.shape[0]}] with unit-stride rows, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if residual is not None:
        _check(what, "residual", residual, 2, x.dtype)
        if residual.shape != x.shape or residual.stride(1) != 1:
            raise ValueError(f"{what}: residual must be {tuple(x.shape)} with unit-stride rows, got "
                             f"{tuple(residual.shape)}")
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((t, n), dtype=x.dtype, device=x.device) if residual is not None else x
    if t:
        block = triton.next_power_of_2(n)
        _add_rmsnorm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, n, x.stride(0),
                                  residual.stride(0) if residual is not None else 0, out.stride(0), eps,
                                  HAS_RES=residual is not None, BLOCK=block,
                                  num_warps=4 if knobs.runtime.interpret else min(16, max(1, block // 256)))
    return out, res_out


def add_rmsnorm_reference(x, weight, eps, residual=None):
    """Hugging Face's ``Qwen3RMSNorm`` after ``residual + x``, in torch."""
    s = x if residual is None else residual + x
    h = s.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), s


# ---------------------------------------------------------------------------------------------- q/k norm + RoPE + cache
@triton.jit
def _norm_rope_half(x1, x2, w_ptr, c, s, D: tl.constexpr, HALF: tl.constexpr, eps, NORM: tl.constexpr,
                    OUT_TY: tl.constexpr):
    """One head's halves: optional RMSNorm with ``w_ptr`` (fp32 statistics, rounded, times the weight, rounded),
    then ``x * cos + rotate_half(x) * sin`` with each product and the sum rounded to ``OUT_TY``."""
    if NORM:
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(a1 * a1, 0) + tl.sum(a2 * a2, 0)) / D + eps)
        i = tl.arange(0, HALF)
        w1 = tl.load(w_ptr + i).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i).to(tl.float32)
        x1 = (w1 * (a1 * inv).to(OUT_TY).to(tl.float32)).to(OUT_TY)
        x2 = (w2 * (a2 * inv).to(OUT_TY).to(tl.float32)).to(OUT_TY)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    o1 = (f1 * c).to(OUT_TY).to(tl.float32) + (-f2 * s).to(OUT_TY).to(tl.float32)
    o2 = (f2 * c).to(OUT_TY).to(tl.float32) + (f1 * s).to(OUT_TY).to(tl.float32)
    return o1.to(OUT_TY), o2.to(OUT_TY)


@triton.jit
def _qk_norm_rope_cache_kernel(qkv_ptr, qw_ptr, kw_ptr, inv_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr,
                               bt_ptr, stride_qkv, S, HQ, HKV, max_len, page, bt_stride, eps,
                               D: tl.constexpr, NORM: tl.constexpr, PAGED: tl.constexpr, KV_OUT: tl.constexpr):
    """Program (token, head) over ``HQ + 2 HKV`` heads: q heads normed + rotated into ``q_ptr`` [T, HQ, D]; k heads
    normed + rotated, v heads as they are, into the cache at the token's position (and ``k_ptr`` / ``v_ptr`` [T,
    HKV, D] with ``KV_OUT``)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    src = qkv_ptr + tok * stride_qkv + head * D
    x1 = tl.load(src + i)
    x2 = tl.load(src + HALF + i)
    out_ty = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + tok)
    b = tok // S
    if PAGED:
        pg = tl.load(bt_ptr + b * bt_stride + pos // page).to(tl.int64)
        slot = pg * page + pos % page
    else:
        slot = b * max_len + pos
    if head < HQ + HKV:
        ang = pos.to(tl.float32) * tl.load(inv_ptr + i)
        c = tl.cos(ang).to(out_ty).to(tl.float32)
        s = tl.sin(ang).to(out_ty).to(tl.float32)
        if head < HQ:
            o1, o2 = _norm_rope_half(x1, x2, qw_ptr, c, s, D, HALF, eps, NORM, out_ty)
            dst = q_ptr + (tok * HQ + head) * D
            tl.store(dst + i, o1)
            tl.store(dst + HALF + i, o2)
        else:
            o1, o2 = _norm_rope_half(x1, x2, kw_ptr, c, s, D, HALF, eps, NORM, out_ty)
            kh = head - HQ
            dst = kc_ptr + (slot * HKV + kh) * D
            tl.store(dst + i, o1)
            tl.store(dst + HALF + i, o2)
            if KV_OUT:
                tl.store(k_ptr + (tok * HKV + kh) * D + i, o1)
                tl.store(k_ptr + (tok * HKV + kh) * D + HALF + i, o2)
    else:
        vh = head - HQ - HKV
        dst = vc_ptr + (slot * HKV + vh) * D
        tl.store(dst + i, x1)
        tl.store(dst + HALF + i, x2)
        if KV_OUT:
            tl.store(v_ptr + (tok * HKV + vh) * D + i, x1)
            tl.store(v_ptr + (tok * HKV + vh) * D + HALF + i, x2)


def qk_norm_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, *, num_heads: int, num_kv_heads: int, seq: int,
                       q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                       block_table: torch.Tensor | None = None, return_kv: bool = False):
    """The attention's input from the fused projection ``qkv`` [T, (Hq + 2 Hkv) * D] (unit-stride rows; ``T = B *
    seq`` tokens, sequence-major): returns ``q`` [T, Hq, D] (normed with ``q_norm`` [D] when given, rotated at
    ``positions`` [B, seq] by ``inv_freq`` [D / 2] fp32), and with ``return_kv`` also ``(k, v)`` [T, Hkv, D]; k
    (normed, rotated) and v are stored into the cache: ``k_cache`` / ``v_cache`` [B, max_len, Hkv, D] (contiguous)
    or [pages, page, Hkv, D] with ``block_table`` [B, pages per sequence] int32. Head dims: even, a power of two."""
    what = "qk_norm_rope_cache"
    _check(what, "qkv", qkv, 2)
    d = k_cache.shape[-1]
    t = qkv.shape[0]
    hq, hkv = num_heads, num_kv_heads
    if qkv.shape[1] != (hq + 2 * hkv) * d or qkv.stride(1) != 1:
        raise ValueError(f"{what}: qkv must be [T, ({hq} + 2 * {hkv}) * {d}] with unit-stride rows, got "
                         f"{tuple(qkv.shape)}")
    if d < 2 or d & (d - 1):
        raise ValueError(f"{what}: head dim must be a power of two >= 2, got {d}")
    if seq < 1 or t % seq or tuple(positions.shape) != (t // seq, seq):
        raise ValueError(f"{what}: positions must be [B, seq] = [{t // max(seq, 1)}, {seq}], got "
                         f"{tuple(positions.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != qkv.dtype or c.dim() != 4 or c.shape[2] != hkv or not c.is_contiguous():
            raise ValueError(f"{what}: {name} must be a contiguous [*, *, {hkv}, {d}] {qkv.dtype} tensor, got "
                             f"{tuple(c.shape)} {c.dtype}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{what}: give both q_norm and k_norm, or neither")
    if inv_freq.dtype != torch.float32 or inv_freq.numel() != d // 2:
        raise ValueError(f"{what}: inv_freq must be [{d // 2}] fp32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    q = torch.empty((t, hq, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, hkv, d), dtype=qkv.dtype, device=qkv.device) if return_kv else q
    v = torch.empty((t, hkv, d), dtype=qkv.dtype, device=qkv.device) if return_kv else q
    paged = block_table is not None
    if t:
        _qk_norm_rope_cache_kernel[(t, hq + 2 * hkv)](
            qkv, q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv, inv_freq,
            positions.contiguous(), q, k, v, k_cache, v_cache, block_table if paged else positions, qkv.stride(0),
            seq, hq, hkv, k_cache.shape[1] if not paged else 0, k_cache.shape[1] if paged else 1,
            block_table.stride(0) if paged else 0, eps,
            D=d, NORM=q_norm is not None, PAGED=paged, KV_OUT=return_kv, num_warps=1)
    return (q, k, v) if return_kv else q


def qk_norm_rope_cache_reference(qkv, positions, inv_freq, k_cache, v_cache, *, num_heads, num_kv_heads, seq,
                                 q_norm=None, k_norm=None, eps=1e-6, block_table=None, return_kv=False):
    """Torch, as the layers' torch mode computes it (HF's ops); writes the caches the same way."""
    d = k_cache.shape[-1]
    t = qkv.shape[0]
    b = t // seq
    q, k, v = torch.split(qkv.view(b, seq, num_heads + 2 * num_kv_heads, d), (num_heads, num_kv_heads,
                                                                             num_kv_heads), dim=2)
    if q_norm is not None:
        q = add_rmsnorm_reference(q, q_norm, eps)[0]
        k = add_rmsnorm_reference(k, k_norm, eps)[0]
    cos, sin = rope_cos_sin(inv_freq, positions, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    bi = torch.arange(b, device=qkv.device)[:, None].expand_as(positions)
    if block_table is None:
        k_cache[bi, positions], v_cache[bi, positions] = k, v
    else:
        page = block_table[bi, torch.div(positions, k_cache.shape[1], rounding_mode="floor")].long()
        slot = positions % k_cache.shape[1]
        k_cache[page, slot], v_cache[page, slot] = k, v
    q = q.reshape(t, num_heads, d)
    return (q, k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d)) if return_kv else q


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """``cos, sin`` [*positions.shape, head_dim] in ``dtype`` (HF's: angles in fp32, both halves repeated)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [..., S, H, D] and ``cos`` / ``sin`` [..., S, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]


# ---------------------------------------------------------------------------------------------- SiLU * up
@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    a = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out_ptr + row * I + offs, (a * u).to(ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` of ``x`` [T, 2 I] with unit-stride rows: [T, I] (each op rounded as torch's)."""
    what = "silu_mul"
    _check(what, "x", x, 2)
    t, n = x.shape
    if n % 2 or x.stride(1) != 1:
        raise ValueError(f"{what}: x must be [T, 2 * I] with unit-stride rows, got {tuple(x.shape)}")
    i = n // 2
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t and i:
        block = min(triton.next_power_of_2(i), 4096 if knobs.runtime.interpret else 1024)
        _silu_mul_kernel[(t, triton.cdiv(i, block))](x, out, i, x.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
