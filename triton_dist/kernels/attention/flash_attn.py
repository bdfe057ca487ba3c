"""The prefill flash-attention forward (FlashAttention-2): packed variable-length sequences or a padded batch, causal
(bottom-right aligned) or not, any GQA ratio, soft-capping, and the rows' log-sum-exp.

Shapes ("NHD", as in :mod:`._common`):

* varlen (:func:`flash_attn_varlen`): ``q`` [total_q, Hq, D], ``k`` / ``v`` [total_k, Hkv, D]; sequence ``b`` is rows
  ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k`` / ``v``
  (int32 prefix sums on q's device, first 0); ``out`` [total_q, Hq, D], ``lse`` [total_q, Hq];
* batched (:func:`flash_attn`, like flash_attn_func): ``q`` [B, Tq, Hq, D], ``k`` / ``v`` [B, Tk, Hkv, D]; ``out``
  [B, Tq, Hq, D], ``lse`` [B, Tq, Hq]. Same kernel, the sequences found by batch strides instead of ``cu_seqlens``.

Causal: query ``i`` of sequence ``b`` attends key ``j`` iff ``j <= i + off_b`` with ``off_b = Tk_b - Tq_b``
(bottom-right aligned, as flash-attn >= 2.1: the last query sees every key) or, given ``causal_offsets`` [B],
``causal_offsets[b]`` (a chunk of queries at any place of a longer sequence: sequence-parallel zig-zag attention).
A row with no key gets out 0 and lse -inf. ``lse`` is fp32, natural log, over the scaled (and capped) scores
(:mod:`._common`).

Grid: one program per (row block of ``BLOCK_M`` queries, sequence, q head), numbered ``(b * Hq + h) * row_blocks +
block``: the row blocks of one head run side by side, so the programs resident at a time stream the same K/V tiles
(from L2 after the first: at 16k tokens, 32 heads, D = 128 this order is 1.2-1.45x faster than heads side by side,
docs/perf/NOTES.md), and the ``Hq // Hkv`` q heads that read one kv head follow each other. Causal blocks are numbered
from the last, so within a head the longest key ranges start first and the short ones fill the tail. The grid is
sized by ``max_seqlen_q``: a program whose block starts past its sequence's end returns at once. No host sync: a
``max_seqlen_q`` smaller than a sequence leaves its last rows unwritten, a wrong ``cu_seqlens`` reads wrong rows (both
are checked where ``cu_seqlens`` is on the CPU).

A row block (:func:`attend_rows`) walks its keys in two loops: first the tiles that every row of the block may fully
see, with no mask at all (the bulk: the scale folded into one FMA before ``exp2``), then the few masked tiles (the
causal diagonal, the last partial tile) through :func:`._common.attend_tile`; normalisation waits for
:func:`._common.finish_rows`. K/V tiles come through TMA (host tensor descriptors over the [tokens, heads * D] view)
where the layout allows it (unit head-dim stride, heads dense, 16-byte aligned base and token stride, and for the
batched layout batches dense), through masked pointer loads otherwise. Q is loaded once, out and lse stored once.

Reuse (the sequence-parallel prefill): :func:`attend_rows` folds the keys ``lo <= j < hi`` of a sequence into a row
block's running ``(acc, m, l)``, so a kernel that receives K/V in chunks calls it once per chunk, after waiting for
that chunk, and finishes with ``finish_rows``::

    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    q = load_rows(q_ptr, q_tok0, row0, tq, stride_qt, BLOCK_M, HEAD_DIM)   # q_ptr at this q head
    for c in range(first_chunk, last_chunk + 1):          # only the chunks whose keys the block may see
        token = dl.wait(sig_ptr + c, 1, "gpu", "acquire")
        k_c = dl.consume_token(k_desc, token)             # later loads of K/V depend on the wait
        v_c = dl.consume_token(v_desc, token)
        fence_async_proxy()                               # peers' writes visible to TMA too (kernels.gemm)
        acc, m_i, l_i = attend_rows(acc, m_i, l_i, q, k_c, v_c, k_tok0, kv_head, chunk_lo(c), chunk_hi(c), row0,
                                    causal_off, stride_kt, stride_kh, stride_vt, stride_vh, qk_scale2, softcap,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL, SOFTCAP, USE_TMA, DOT_PRECISION)
    out, lse = finish_rows(acc, m_i, l_i)

Chunk bounds need not be multiples of ``BLOCK_N`` and the chunks may come in any order (empty ones too). Keys at or
past ``hi`` are never trusted (scores masked, V rows zeroed), so a chunk not yet received may hold anything, NaN
included.
Pass ``DOT_PRECISION=dot_precision(dtype)`` through (fp32 inputs: full fp32 dots unless torch allows TF32), as
:func:`_launch` does.

Configs (:class:`FlashAttnConfig`): row and key block sizes, warps, pipeline stages, TMA or not; :func:`default_config`
without tuning, :func:`candidate_configs` for ``triton_dist.tune`` (kernel name ``"flash_attn"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

from triton_dist import tune
from ..gemm import check_out, dot_precision
from ._common import (DTYPES, LOG2E, attend_tile, attention_rows_reference, check_heads, check_tensor, default_scale,
                      finish_rows, soft_cap)

KERNEL_VERSION = "2"  # the autotuner's cache key: bump when the kernel changes
SMEM_BUDGET = 226 << 10  # of the H100/H200's 227 KB per block: Q plus the K/V pipeline stages (128 x 128 tiles at
# D = 128 in 3 stages take 225 KB with the barriers: they fit, scripts/compile_checks/flash_attn.py)


@dataclass(frozen=True)
class FlashAttnConfig:
    """Tile shape and launch parameters of :func:`flash_attn_varlen`: ``block_m`` queries per program, ``block_n`` keys
    per step (powers of two >= 16), warps, pipeline stages of the key loop, K/V by TMA where the layout allows."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    use_tma: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
                raise ValueError(f"FlashAttnConfig: {name} must be a power of two >= 16, got {v!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"FlashAttnConfig: num_stages must be an int >= 1, got {self.num_stages!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"FlashAttnConfig: num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")


# The interpreter costs ~0.1 ms per op per program: mid-sized tiles, several per test sequence.
CPU_CONFIG = FlashAttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


def smem_bytes(cfg: FlashAttnConfig, head_dim: int, dtype: torch.dtype) -> int:
    """Shared memory of a config's tiles: the Q block and ``num_stages`` K and V tiles."""
    return (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * head_dim * torch.empty((), dtype=dtype).element_size()


def default_config(head_dim: int, dtype: torch.dtype, causal: bool = False) -> FlashAttnConfig:
    """A config without tuning (the CPU world: :data:`CPU_CONFIG`): 128 queries x 128 keys, 8 warps (two warpgroups
    of 64 rows), 3 stages (two K/V tiles in flight: 1.2x the 2-stage time at D = 128, docs/perf/NOTES.md) for 16-bit
    inputs up to D = 128; 64 keys in 2 stages at D = 256 (3 do not fit); small tiles for fp32 (no tensor-core fp32).
    The same for causal and not today (``causal`` is part of the signature for the tuner's sake)."""
    if knobs.runtime.interpret:
        return CPU_CONFIG
    if dtype == torch.float32:
        return FlashAttnConfig(64, 32, num_warps=4 if head_dim <= 128 else 8, num_stages=2)
    if head_dim == 256:
        return FlashAttnConfig(128, 64, num_warps=8, num_stages=2)
    return FlashAttnConfig(128, 128, num_warps=8, num_stages=3)


def candidate_configs(head_dim: int, dtype: torch.dtype, causal: bool = False) -> list[FlashAttnConfig]:
    """Configs an autotuner may time: 128-row blocks on 8 warps and (D <= 128) 64-row blocks of 64 keys on 4 (one
    warpgroup per 64 rows; 64 x 128 tiles on 4 warps were the slowest of all at 4k-16k tokens), key blocks of 32-128,
    2-4 stages, each within :data:`SMEM_BUDGET`."""
    if dtype == torch.float32:
        shapes = [(64, 32, 4 if head_dim <= 128 else 8), (32, 32, 4), (64, 64, 8)]
        stages = (2,)
    else:
        # at D = 256 a 64-row block on one warpgroup spills (its 64 x 256 fp32 accumulator alone is 128 registers
        # a thread): 128 rows on 8 warps only, 32 or 64 keys
        wide = (128, 64) if head_dim <= 128 else (64, 32)
        shapes = [(128, bn, 8) for bn in wide] + ([(64, 64, 4)] if head_dim <= 128 else [])
        stages = (2, 3, 4)
    out = []
    for bm, bn, warps in shapes:
        for s in stages:
            cfg = FlashAttnConfig(bm, bn, num_warps=warps, num_stages=s)
            if smem_bytes(cfg, head_dim, dtype) <= SMEM_BUDGET and cfg not in out:
                out.append(cfg)
    return out


# ---------------------------------------------------------------------------------------------- device side
@triton.jit
def load_rows(ptr, tok0, row0, rows_end, stride_t, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows ``row0 .. row0 + BLOCK_M`` of one head of a sequence, [BLOCK_M, HEAD_DIM]: ``ptr`` points at the head,
    row ``r`` is token ``tok0 + r`` (stride ``stride_t``); rows at or past ``rows_end`` read as zeros."""
    rows = row0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    ptrs = ptr + (tok0 + rows).to(tl.int64)[:, None] * stride_t + d[None, :]
    return tl.load(ptrs, mask=(rows < rows_end)[:, None], other=0.0)


@triton.jit
def _kv_tile(k, v, tok0, kv_head, start, hi, stride_kt, stride_kh, stride_vt, stride_vh,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """``(k_t [D, N], v [N, D])`` of keys ``start .. start + BLOCK_N`` (tokens ``tok0 + j``) of kv head ``kv_head``;
    ``MASKED``: keys at or past ``hi`` read as zeros (V for certain: their scores are masked by the caller)."""
    if USE_TMA:
        k_t = k.load([tok0 + start, kv_head * HEAD_DIM]).T
        vt = v.load([tok0 + start, kv_head * HEAD_DIM])
        if MASKED:
            keep = (start + tl.arange(0, BLOCK_N)) < hi
            vt = tl.where(keep[:, None], vt, tl.zeros_like(vt))
    else:
        offs = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, HEAD_DIM)
        tok = (tok0 + offs).to(tl.int64)
        k_ptrs = k + kv_head * stride_kh + tok[None, :] * stride_kt + d[:, None]
        v_ptrs = v + kv_head * stride_vh + tok[:, None] * stride_vt + d[None, :]
        if MASKED:
            keep = offs < hi
            k_t = tl.load(k_ptrs, mask=keep[None, :], other=0.0)
            vt = tl.load(v_ptrs, mask=keep[:, None], other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
    return k_t, vt


@triton.jit
def _bulk_step(acc, m_i, l_i, q, k_t, v, qk_scale2, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """:func:`._common.attend_tile` for a tile whose every key is attended by every row: the same base-2 math without
    the mask, and without the all-masked guard (every score is finite, so the new max is); the scale is folded into
    the ``exp2`` argument (one FMA per score)."""
    s = tl.dot(q, k_t, out_dtype=tl.float32, input_precision=DOT_PRECISION)
    if SOFTCAP:
        s = soft_cap(s * (qk_scale2 * 0.6931471805599453), softcap) * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale2)
        p = tl.exp2(s * qk_scale2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=tl.float32, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_rows(acc, m_i, l_i, q, k, v, k_tok0, kv_head, lo, hi, row0, causal_off,
                stride_kt, stride_kh, stride_vt, stride_vh, qk_scale2, softcap,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys ``lo <= j < hi`` of one sequence into the running ``(acc, m_i, l_i)`` of a row block (queries ``row0
    .. row0 + BLOCK_M`` of the sequence, ``q`` [BLOCK_M, HEAD_DIM]); returns the new ``(acc, m_i, l_i)`` (base 2, as
    :func:`._common.attend_tile`). Call it once for all keys, or once per chunk of keys in any order.

    Key ``j`` is token ``k_tok0 + j`` of ``k`` / ``v``: with ``USE_TMA`` descriptors of the [tokens, Hkv * D] views
    (block [BLOCK_N, HEAD_DIM]), else pointers at head 0 with the given token / head strides (head dim contiguous).
    ``CAUSAL``: query ``i`` sees key ``j`` iff ``j <= i + causal_off``. ``qk_scale2 = scale * log2(e)``; ``SOFTCAP``:
    scores capped at ``softcap`` (natural-log units). Tiles that every row fully sees run unmasked first, then the
    masked ones (causal diagonal, the partial last tile). Keys at or past ``hi`` are never read into the result."""
    if CAUSAL:
        full_end = tl.minimum(hi, row0 + causal_off + 1)  # keys the block's first row (so every row) sees
        last = tl.minimum(hi, row0 + BLOCK_M + causal_off)  # one past the last key its last row sees
    else:
        full_end = hi
        last = hi
    mid = lo + (tl.maximum(full_end - lo, 0) // BLOCK_N) * BLOCK_N
    for start in tl.range(lo, mid, BLOCK_N):
        k_t, vt = _kv_tile(k, v, k_tok0, kv_head, start, hi, stride_kt, stride_kh, stride_vt, stride_vh,
                           BLOCK_N, HEAD_DIM, USE_TMA, False)
        acc, m_i, l_i = _bulk_step(acc, m_i, l_i, q, k_t, vt, qk_scale2, softcap, SOFTCAP, DOT_PRECISION)
    rows = row0 + tl.arange(0, BLOCK_M)
    for start in tl.range(mid, last, BLOCK_N):
        k_t, vt = _kv_tile(k, v, k_tok0, kv_head, start, hi, stride_kt, stride_kh, stride_vt, stride_vh,
                           BLOCK_N, HEAD_DIM, USE_TMA, True)
        cols = start + tl.arange(0, BLOCK_N)
        valid = cols[None, :] < hi
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + causal_off)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_t, vt, valid, qk_scale2, softcap, SOFTCAP, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _flash_attn_kernel(q, k, v, o, lse, cu_q, cu_k, offsets_ptr,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, seqlen_q, seqlen_k, B, HQ, GROUP, row_blocks,
                       qk_scale2, softcap,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
                       CAUSAL: tl.constexpr, OFFSETS: tl.constexpr, SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr,
                       STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program ``(b * HQ + h) * row_blocks + block`` (causal: blocks counted from the last) computes rows
    ``block * BLOCK_M ..`` of sequence ``b``, q head ``h``. ``o`` / ``lse`` are contiguous [tokens, HQ, D] / [tokens,
    HQ]. VARLEN: sequences from ``cu_q`` / ``cu_k`` (batch strides 0); else ``seqlen_q`` / ``seqlen_k`` and batch
    strides (with TMA the batches are dense in the descriptors' token rows)."""
    pid = tl.program_id(0)
    block = pid % row_blocks
    rest = pid // row_blocks
    h = rest % HQ
    b = rest // HQ
    if CAUSAL:
        block = row_blocks - 1 - block  # longest key ranges first
    row0 = block * BLOCK_M
    if VARLEN:
        q_tok0 = tl.load(cu_q + b)
        tq = tl.load(cu_q + b + 1) - q_tok0
        k_tok0 = tl.load(cu_k + b)
        tk = tl.load(cu_k + b + 1) - k_tok0
        o_tok0 = q_tok0
    else:
        q_tok0 = 0
        tq = seqlen_q
        tk = seqlen_k
        o_tok0 = b * seqlen_q
        if USE_TMA:
            k_tok0 = b * seqlen_k
        else:
            k_tok0 = 0
            k += b.to(tl.int64) * stride_kb
            v += b.to(tl.int64) * stride_vb
    if row0 >= tq:
        return
    if OFFSETS:
        causal_off = tl.load(offsets_ptr + b)
    else:
        causal_off = tk - tq
    q_head = q + b.to(tl.int64) * stride_qb + h * stride_qh
    qb = load_rows(q_head, q_tok0, row0, tq, stride_qt, BLOCK_M, HEAD_DIM)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = attend_rows(acc, m_i, l_i, qb, k, v, k_tok0, h // GROUP, 0, tk, row0, causal_off,
                                stride_kt, stride_kh, stride_vt, stride_vh, qk_scale2, softcap,
                                BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL, SOFTCAP, USE_TMA, DOT_PRECISION)
    out, row_lse = finish_rows(acc, m_i, l_i)
    rows = row0 + tl.arange(0, BLOCK_M)
    keep = rows < tq
    tok = (o_tok0 + rows).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    tl.store(o + (tok * HQ + h)[:, None] * HEAD_DIM + d[None, :], out.to(o.dtype.element_ty), mask=keep[:, None])
    if STORE_LSE:
        tl.store(lse + tok * HQ + h, row_lse, mask=keep)


# ---------------------------------------------------------------------------------------------- host side
_dummies: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments a launch does not read (made once per device and dtype)."""
    key = (str(device), dtype)
    if key not in _dummies:
        _dummies[key] = torch.zeros(1, dtype=dtype, device=device)
    return _dummies[key]


def _check_qkv(what: str, q, k, v, ndim: int):
    """Types, dims, dtypes, devices, head counts and dims of q / k / v; returns (hq, hkv, d)."""
    check_tensor(what, "q", q, ndim, DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(what, name, t, ndim, DTYPES, q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    hq, d = q.shape[-2], q.shape[-1]
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{what}: k has {k.shape[-2]} heads and v {v.shape[-2]}; they must be equal")
    check_heads(what, hq, k.shape[-2], d, k.shape[-1], v.shape[-1])
    if tuple(k.shape[:-2]) != tuple(v.shape[:-2]):
        raise ValueError(f"{what}: k is {tuple(k.shape)} and v {tuple(v.shape)}; expected the same tokens")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{what}: {name} must have a contiguous head dim (stride 1), got strides {t.stride()}")
    return hq, k.shape[-2], d


def _check_scalars(what: str, scale, softcap, config) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0):
        raise ValueError(f"{what}: scale must be a positive float or None (1 / sqrt(D)), got {scale!r}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap >= 0:
        raise ValueError(f"{what}: softcap must be a float >= 0 (0: no capping), got {softcap!r}")
    if config is not None and not isinstance(config, FlashAttnConfig):
        raise TypeError(f"{what}: config must be a FlashAttnConfig, got {type(config).__name__}")


def _check_max(what: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what}: {name} must be an int >= 0 (the longest sequence), got {value!r}")
    return value


def _check_cu(what: str, cu_q, cu_k, q, k, max_q: int, max_k: int) -> int:
    """cu_seqlens_q / _k: int32, 1-D, the same B + 1 >= 2 entries, on q's device; their contents too when on the
    CPU (no sync there). Returns B."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_tensor(what, name, cu, 1, (torch.int32,), q.device)
        if cu.numel() < 2:
            raise ValueError(f"{what}: {name} must hold B + 1 >= 2 prefix sums (first 0), got {cu.numel()}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{what}: batch mismatch: cu_seqlens_q has {cu_q.numel()} entries and cu_seqlens_k "
                         f"{cu_k.numel()}; both must be B + 1")
    if q.device.type == "cpu":
        for name, cu, total, most, mname in (("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q"),
                                             ("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")):
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or bool((lens < 0).any()) or int(cu[-1]) > total:
                raise ValueError(f"{what}: {name} must be non-decreasing prefix sums from 0 to at most {total} "
                                 f"(the tokens of {'q' if name.endswith('q') else 'k'}), got {cu.tolist()}")
            if int(lens.max()) > most:
                raise ValueError(f"{what}: {mname} = {most} but {name} has a sequence of {int(lens.max())} tokens")
    return cu_q.numel() - 1


def _kv_tma_view(t: torch.Tensor, batched: bool):
    """The [tokens, Hkv * D] view of ``k`` or ``v`` for a TMA descriptor, or None where the layout does not allow
    one (head dim contiguous, heads dense, 16-byte aligned base and token stride; batched: batches dense)."""
    d, h = t.shape[-1], t.shape[-2]
    es = t.element_size()
    ok = (t.stride(-1) == 1 and (h == 1 or t.stride(-2) == d) and t.data_ptr() % 16 == 0
          and (t.stride(-3) * es) % 16 == 0 and t.numel() > 0)
    if batched:
        ok = ok and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))
    if not ok:
        return None
    tokens = t.shape[0] * t.shape[1] if batched else t.shape[0]
    return t.as_strided((tokens, h * d), (t.stride(-3), 1))


def _launch(p: dict, cfg: FlashAttnConfig) -> None:
    """One launch of the kernel for the problem ``p`` (built by the public functions) with ``cfg``."""
    q, k, v, out, lse = p["q"], p["k"], p["v"], p["out"], p["lse"]
    batched = q.dim() == 4
    d = q.shape[-1]
    kv = None
    if cfg.use_tma:
        kv = [_kv_tma_view(t, batched) for t in (k, v)]
        kv = None if kv[0] is None or kv[1] is None else kv
    if kv is not None:
        k_arg, v_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [cfg.block_n, d]) for t in kv)
    else:
        k_arg, v_arg = k, v
    hq, hkv = q.shape[-2], k.shape[-2]
    nb = p["batch"]
    row_blocks = triton.cdiv(p["max_q"], cfg.block_m)
    sb = (lambda t: t.stride(0)) if batched else (lambda t: 0)
    _flash_attn_kernel[(row_blocks * nb * hq,)](
        q, k_arg, v_arg, out, lse, p["cu_q"], p["cu_k"], p["offsets"],
        sb(q), q.stride(-3), q.stride(-2), sb(k), k.stride(-3), k.stride(-2), sb(v), v.stride(-3), v.stride(-2),
        p["max_q"], p["max_k"], nb, hq, hq // hkv, row_blocks, p["scale"] * LOG2E, float(p["softcap"]),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, VARLEN=not batched, CAUSAL=p["causal"],
        OFFSETS=p["has_offsets"], SOFTCAP=p["softcap"] > 0, USE_TMA=kv is not None, STORE_LSE=p["store_lse"],
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _tuned_config(p: dict) -> FlashAttnConfig:
    """The autotuner's choice for this shape bucket (measured once per world on GPUs, then a lookup), or
    :func:`default_config` where it does not tune (the CPU world, ``TRITON_DIST_AUTOTUNE=0``, no world)."""
    q = p["q"]
    d, dtype, causal = q.shape[-1], q.dtype, p["causal"]
    tma = _kv_tma_view(p["k"], q.dim() == 4) is not None and _kv_tma_view(p["v"], q.dim() == 4) is not None
    key = (str(dtype), d, causal, p["softcap"] > 0, "tma" if tma else "ptr",
           tune.bucket_pow2(p["max_q"], lo=128, hi=1 << 16), tune.bucket_pow2(p["max_k"], lo=128, hi=1 << 16))
    return tune.choose("flash_attn", key, lambda: candidate_configs(d, dtype, causal),
                       lambda: default_config(d, dtype, causal), lambda c: _launch(p, c), version=KERNEL_VERSION)


def _run(p: dict, config, return_lse: bool):
    out, lse = p["out"], p["lse"]
    if out.numel() == 0:
        pass
    elif p["k"].numel() == 0:  # no key anywhere
        out.zero_()
        lse.fill_(float("-inf"))
    else:
        _launch(p, config or _tuned_config(p))
    return (out, lse) if return_lse else out


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                      scale: float | None = None, softcap: float = 0.0, causal_offsets: torch.Tensor | None = None,
                      return_lse: bool = False, out: torch.Tensor | None = None,
                      config: FlashAttnConfig | None = None):
    """Attention of packed sequences: ``q`` [total_q, Hq, D], ``k`` / ``v`` [total_k, Hkv, D] (bf16, fp16 or fp32, head
    dim contiguous, D in ``_common.HEAD_DIMS``, ``Hq % Hkv == 0``), ``cu_seqlens_q`` / ``cu_seqlens_k`` [B + 1] int32
    prefix sums on q's device. Returns ``out`` [total_q, Hq, D] (q's dtype; ``out`` if given, contiguous) or, with
    ``return_lse``, ``(out, lse)`` with ``lse`` [total_q, Hq] fp32 (natural log; -inf for rows with no key).

    ``max_seqlen_q`` / ``max_seqlen_k``: the longest sequence of each (Python ints, no host sync: the first sizes the
    grid, so a smaller one than a real sequence leaves that sequence's last rows unwritten; the second only picks the
    tuner's shape bucket; both checked against ``cu_seqlens`` only when it is on the CPU). ``causal``: bottom-right
    aligned (query ``i`` sees key ``j <= i + Tk_b - Tq_b``), or ``j <= i + causal_offsets[b]`` with
    ``causal_offsets`` ([B] int32, any values). ``scale``: default ``1 / sqrt(D)``; ``softcap`` > 0: scores
    ``softcap * tanh(s / softcap)``. Tokens past ``cu_seqlens[-1]`` are neither read nor written. ``config``: a
    :class:`FlashAttnConfig`; None: the autotuner's choice (``triton_dist.tune``; collective on the first call of a
    shape bucket in a GPU world) or :func:`default_config`."""
    what = "flash_attn_varlen"
    hq, _, d = _check_qkv(what, q, k, v, 3)
    _check_scalars(what, scale, softcap, config)
    max_q = _check_max(what, "max_seqlen_q", max_seqlen_q)
    max_k = _check_max(what, "max_seqlen_k", max_seqlen_k)
    batch = _check_cu(what, cu_seqlens_q, cu_seqlens_k, q, k, max_q, max_k)
    if causal_offsets is not None:
        if not causal:
            raise ValueError(f"{what}: causal_offsets applies to causal attention only (pass causal=True)")
        check_tensor(what, "causal_offsets", causal_offsets, 1, (torch.int32,), q.device)
        if causal_offsets.numel() != batch:
            raise ValueError(f"{what}: causal_offsets has {causal_offsets.numel()} entries, expected one per "
                             f"sequence (B = {batch})")
    out = check_out(what, out, tuple(q.shape), q.dtype, q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else \
        _dummy(q.device, torch.float32)
    p = dict(q=q, k=k, v=v, out=out, lse=lse, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, batch=batch, max_q=max_q,
             max_k=max_k, causal=bool(causal), scale=default_scale(d, scale), softcap=float(softcap),
             has_offsets=causal_offsets is not None, store_lse=return_lse,
             offsets=causal_offsets if causal_offsets is not None else _dummy(q.device, torch.int32))
    return _run(p, config, return_lse)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
               softcap: float = 0.0, return_lse: bool = False, out: torch.Tensor | None = None,
               config: FlashAttnConfig | None = None):
    """:func:`flash_attn_varlen` for a batch of equal lengths (flash_attn_func's layout): ``q`` [B, Tq, Hq, D], ``k``
    / ``v`` [B, Tk, Hkv, D], any strides with the head dim contiguous (no copies: the kernel walks batch strides).
    Returns ``out`` [B, Tq, Hq, D] or ``(out, lse [B, Tq, Hq])``; causal is bottom-right aligned (``Tk - Tq``)."""
    what = "flash_attn"
    _, _, d = _check_qkv(what, q, k, v, 4)
    _check_scalars(what, scale, softcap, config)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{what}: batch mismatch: q has {q.shape[0]} sequences and k/v {k.shape[0]}")
    out = check_out(what, out, tuple(q.shape), q.dtype, q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else \
        _dummy(q.device, torch.float32)
    dummy = _dummy(q.device, torch.int32)
    p = dict(q=q, k=k, v=v, out=out, lse=lse, cu_q=dummy, cu_k=dummy, batch=q.shape[0], max_q=q.shape[1],
             max_k=k.shape[1], causal=bool(causal), scale=default_scale(d, scale), softcap=float(softcap),
             has_offsets=False, store_lse=return_lse, offsets=dummy)
    return _run(p, config, return_lse)


def flash_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
                         cu_seqlens_k: torch.Tensor | None = None, *, causal: bool = False, scale: float | None = None,
                         softcap: float = 0.0, causal_offsets: torch.Tensor | None = None):
    """Pure torch ``(out, lse)`` in fp32 (``_common.attention_rows_reference`` per sequence), for either layout: with
    ``cu_seqlens_*`` the varlen one (``out`` [total_q, Hq, D], ``lse`` [total_q, Hq]), without them the batched one
    ([B, Tq, Hq, D], [B, Tq, Hq]). Rows past ``cu_seqlens_q[-1]`` are 0 / -inf."""
    d = q.shape[-1]
    sc = default_scale(d, scale)
    if cu_seqlens_q is None:
        outs, lses = zip(*(flash_attn_reference(q[b], k[b], v[b], torch.tensor([0, q.shape[1]]),
                                                torch.tensor([0, k.shape[1]]), causal=causal, scale=sc,
                                                softcap=softcap) for b in range(q.shape[0])))
        return torch.stack(outs), torch.stack(lses)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        off = None
        if causal:
            off = int(causal_offsets[b]) if causal_offsets is not None else (ck[b + 1] - ck[b]) - (cq[b + 1] - cq[b])
        if cq[b + 1] > cq[b]:
            out[qs], lse[qs] = attention_rows_reference(q[qs], k[ks], v[ks], scale=sc, softcap=softcap,
                                                        causal_offset=off)
    return out, lse
