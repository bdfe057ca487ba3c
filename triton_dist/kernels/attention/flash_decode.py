"""Local flash-decoding: one new query token per sequence against its KV cache, split along the keys.

Shapes (FlashInfer / vLLM "NHD", see ``_common``):

* ``q`` [B, Hq, D]; ``kv_lens`` [B] int32 (tokens of each sequence; 0 allowed: output 0, lse ``-inf``);
* contiguous KV: ``k_cache`` / ``v_cache`` [B, T, Hkv, D], sequence ``b`` attends to rows ``0 .. kv_lens[b]-1``;
* paged KV: ``k_cache`` / ``v_cache`` [num_pages, page_size, Hkv, D] and ``block_table`` [B, max_pages] int32: token
  ``t`` of sequence ``b`` is row ``t % page_size`` of page ``block_table[b, t // page_size]`` (any page size >= 1);
* output [B, Hq, D] (q's dtype, or ``out_dtype``) and, with ``return_lse``, lse [B, Hq] fp32 (natural log).

The bound of a call is the cache's capacity per sequence (``T``, or ``max_pages * page_size``); ``kv_lens`` is
clamped to it inside the kernel, so nothing past the cache is read.

Split / combine protocol:

* program ``(b, kv head, head block, split)`` of :func:`_split_kernel` loads the q heads of its kv head (the GQA group,
  padded to 16 rows: ``tl.dot`` needs 16) once, streams the keys ``[split * span, (split + 1) * span)`` of the
  sequence (clipped to its length) in tiles of ``block_n`` keys through :func:`~._common.attend_tile`, so every K/V
  byte is read once per kv head; a split past the end of its sequence attends to nothing (out 0, lse ``-inf``);
* one split: it writes the output (and lse) directly. Several: each writes its fp32 partial and lse to a workspace
  [B, Hq, splits, D] / [B, Hq, splits] (cached per device and stream, grown only when a call needs more), and
  :func:`combine_partials` merges the splits of each row with :func:`~._common.merge_step` in split order
  (deterministic), launched with programmatic dependent launch on GPUs so it is resident when the splits finish.

The split count comes from the bound, the batch, the kv heads and the SM count (:func:`split_plan`), never from the
values in ``kv_lens``: there is no host sync, and a call is CUDA-graph capturable (after a first call of the shape on
the capturing stream: it tunes, and allocates the workspace); a replay with other ``kv_lens`` is right.

Configs (:class:`FlashDecodeConfig`): key tile, warps, pipeline stages and the split policy's knobs;
:func:`default_config` without tuning, :func:`candidate_configs` for the autotuner (``triton_dist.tune``, kernel name
``"flash_decode"``), :data:`CPU_CONFIG` in the interpreter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from triton_dist import tune
from ..gemm import check_out, core_sms, dot_precision, stream_key
from ._common import (DTYPES, LOG2E, attend_tile, attention_rows_reference, check_heads, check_tensor,
                      default_scale, finish_rows, merge_step, next_pow2)

KERNEL_VERSION = "1"  # the autotuner's cache key: bump when the kernel changes
MIN_ROWS = 16  # tl.dot's least M: a GQA group is padded to this many rows
MAX_TILE_ELEMS = 8192  # rows x head dim of a program's q block (its fp32 accumulator: 64 registers a thread at 4 warps)
GOOD_FILL = 0.9  # split_plan takes the fewest splits whose programs fill this much of their waves of slots
SMEM_BUDGET = 200 << 10  # of the H100/H200's 227 KB per block: the K/V buffers of one program


@dataclass(frozen=True)
class FlashDecodeConfig:
    """Key tile, launch parameters and split policy of :func:`flash_decode`.

    ``num_stages``: software pipeline stages of the key loop as Triton counts them for a contiguous cache
    (``num_stages - 1`` K/V tiles in flight); a paged cache's loop gets ``2 * num_stages - 1`` (its page-id load takes
    stages of its own), so the K/V depth is the same. ``programs_per_sm``: how many programs :func:`split_plan`
    counts on one SM at once (its slots are ``sms * programs_per_sm``); 0: as many as the compiled kernel's registers
    and shared memory let the GPU hold (:func:`resident_programs`; 1 in the interpreter). ``min_split_tokens``: the
    least keys of the bound per split (its prologue and epilogue stay small against its stream); ``max_splits``: at
    most this many; ``splits``: exactly this many (0: the policy), at most one per key tile; ``pdl``: launch the
    combine with programmatic dependent launch (GPUs)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 0
    min_split_tokens: int = 256
    max_splits: int = 64
    splits: int = 0
    pdl: bool = True

    def __post_init__(self):
        what = type(self).__name__
        if not _is_int(self.block_n) or self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"{what}: block_n must be a power of two >= 16, got {self.block_n!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"{what}: num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        for name, least in (("num_stages", 1), ("programs_per_sm", 0), ("min_split_tokens", 1), ("max_splits", 1),
                            ("splits", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < least:
                raise ValueError(f"{what}: {name} must be an int >= {least}, got {v!r}")
        if not isinstance(self.pdl, bool):
            raise ValueError(f"{what}: pdl must be a bool, got {self.pdl!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The interpreter costs ~0.1 ms per op per program: mid-sized key tiles, and 2 'programs per SM' of its 4 'SMs' so
# that small test shapes still split (the combine path stays tested).
CPU_CONFIG = FlashDecodeConfig(block_n=32, num_warps=4, num_stages=1, programs_per_sm=2, min_split_tokens=32)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def smem_bytes(block_n: int, head_dim: int, dtype: torch.dtype, stages: int) -> int:
    """About the shared memory of a program compiled for sm_90 (a little above what scripts/compile_checks/
    flash_decode.py reports): ``stages - 1`` K and V buffers, the q block, the probabilities and some scratch. E.g.
    bf16, D 128, block N 64, 3 stages: 72 KB (70 KB compiled)."""
    e = _elem(dtype)
    return (stages - 1) * 2 * block_n * head_dim * e + MIN_ROWS * (head_dim + block_n) * e + (2 << 10)


def _cfg(block_n: int, stages: int, warps: int = 4, **kw) -> FlashDecodeConfig:
    return FlashDecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages, **kw)


def _base_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """16 KB key tiles: block N 128 / 64 / 32 for 16-bit head dims 64 / 128 / 256, half that for fp32."""
    return max(16, (16 << 10) // (head_dim * _elem(dtype)))


def default_config(batch: int, hq: int, hkv: int, head_dim: int, bound: int, dtype: torch.dtype, sms: int,
                   page_size: int | None = None) -> FlashDecodeConfig:
    """A config without tuning (the CPU world: :data:`CPU_CONFIG`): 16 KB key tiles (:func:`_base_block_n`), 3 stages
    (two K/V tiles in flight), 4 warps (bf16, D 128: 70 KB of shared memory and about 90 registers a thread, so 3
    programs share an SM: one's prologue hides behind the others' streams). The split count is :func:`split_plan`'s,
    for the actual call's shape and the compiled kernel's residency."""
    if knobs.runtime.interpret:
        return CPU_CONFIG
    return _cfg(_base_block_n(head_dim, dtype), 3)


def candidate_configs(batch: int, hq: int, hkv: int, head_dim: int, bound: int, dtype: torch.dtype, sms: int,
                      page_size: int | None = None) -> list[FlashDecodeConfig]:
    """Configs an autotuner may time: the default; the default with fewer, longer splits (each at least 1024 keys;
    or splits planned for one program per SM, i.e. a third to a half as many); its tile with 2 and 4 stages; half
    tiles with 4 stages; double tiles with 2 stages at 4 and 8 warps and 3 stages at 8; quadruple tiles at 8 warps
    (each only where its buffers fit :data:`SMEM_BUDGET`): 9-10 configs."""
    base = default_config(batch, hq, hkv, head_dim, bound, dtype, sms, page_size)
    if knobs.runtime.interpret:
        return [base]
    bn = base.block_n
    out = [base, _cfg(bn, 3, min_split_tokens=1024), _cfg(bn, 3, programs_per_sm=1)]
    for block_n, stages, warps in ((bn, 2, 4), (bn, 4, 4), (bn // 2, 4, 4), (2 * bn, 2, 4), (2 * bn, 2, 8),
                                   (2 * bn, 3, 8), (4 * bn, 2, 8)):
        if block_n >= 16 and smem_bytes(block_n, head_dim, dtype, stages) <= SMEM_BUDGET:
            out.append(_cfg(block_n, stages, warps))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def block_h(group: int, head_dim: int) -> int:
    """Rows of a program's q block: the GQA group rounded up to a power of two >= 16, at most 64 and at most
    :data:`MAX_TILE_ELEMS` / head dim (128 rows spilled registers at D 64); a larger group takes several head blocks,
    each reading its kv head again."""
    return min(max(MIN_ROWS, next_pow2(group)), 64, max(MIN_ROWS, MAX_TILE_ELEMS // head_dim))


def unaligned_config(cfg: FlashDecodeConfig, head_dim: int) -> FlashDecodeConfig:
    """The slow path's config where a q / K / V stride is not a multiple of 16 elements: the loads cannot be 16-byte
    vectors nor ``cp.async``, so the tiles stay in registers: at most 4096 elements a tile (block N 32 at D 128; the
    default 64 x 128 tile spilled), not pipelined."""
    return replace(cfg, block_n=min(cfg.block_n, max(16, 4096 // head_dim)), num_stages=1)


def kernel_stages(cfg: FlashDecodeConfig, page_size: int) -> int:
    """The split kernel's ``num_stages`` for ``cfg``: Triton's pipeliner gives a load whose address comes from another
    load in the loop (the page id) about half of the stages, so a paged cache gets ``2 * num_stages - 1`` for the same
    K/V depth (measured on sm_90 compiles: 3 stages pipeline 2 K/V tiles of a contiguous cache, 5 of a paged one)."""
    return 2 * cfg.num_stages - 1 if page_size else cfg.num_stages


def split_plan(cfg: FlashDecodeConfig, units: int, bound: int, sms: int, resident: int = 1) -> tuple[int, int]:
    """``(splits, span)``: the key range of each of ``units`` (batch x kv heads x head blocks) is cut into ``splits``
    spans of ``span`` keys (a multiple of ``block_n``) covering ``bound``. ``cfg.splits`` if set; else the fewest
    splits whose programs fill :data:`GOOD_FILL` of their waves of ``sms * programs_per_sm`` slots (``resident`` where
    ``programs_per_sm`` is 0), or else the best fill, each span at least ``min_split_tokens`` keys, at most
    ``max_splits`` splits. Depends on the bound only, never on the sequences' lengths."""
    tiles = triton.cdiv(bound, cfg.block_n)
    if tiles == 0:
        return 1, cfg.block_n
    if cfg.splits:
        want = cfg.splits
    else:
        slots = sms * (cfg.programs_per_sm or resident)
        most = max(1, min(cfg.max_splits, bound // cfg.min_split_tokens))
        want, best_fill = 1, -1.0
        for s in range(1, min(most, tiles) + 1):
            s = triton.cdiv(tiles, triton.cdiv(tiles, s))  # the splits that equal spans of whole tiles give
            progs = units * s
            fill = progs / (triton.cdiv(progs, slots) * slots)
            if fill > best_fill + 1e-9:
                want, best_fill = s, fill
            if fill >= GOOD_FILL:
                break
    per = triton.cdiv(tiles, max(1, min(want, tiles)))
    return triton.cdiv(tiles, per), per * cfg.block_n


_resident: dict = {}  # (device, config, dtype, head dim, rows, page size, softcap, aligned) -> programs per SM


def resident_programs(kernel, device: torch.device) -> int:
    """Programs of a compiled kernel one SM holds at once: the least of what its registers, its shared memory and
    its warps allow (CUDA's occupancy rules; registers are allocated per warp in units of 256)."""
    props = torch.cuda.get_device_properties(device)
    kernel._init_handles()  # loads the binary: n_regs is known from then on
    warps = kernel.metadata.num_warps
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    per_warp = max(1, triton.cdiv(max(kernel.n_regs, 1) * 32, 256) * 256)
    by_regs = regs // (per_warp * warps)
    by_smem = smem // (kernel.metadata.shared + 1024)  # the driver reserves 1 KB a block
    return max(1, min(by_regs, by_smem, threads // (32 * warps), 32))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _kv_pages(bt_row, tok, tok_ok, n0, num_pages, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(page, slot)`` (int64) of the keys ``tok`` (``n0 + arange(BLOCK_N)``) of one sequence, shared by its K and V
    loads: page 0 and slot ``tok`` for its own cache (``PAGE == 0``: ``bt_row`` unused), else the page ids of its
    block table (a tile inside one page, ``PAGE % BLOCK_N == 0``, loads one id; smaller pages gather one id per key),
    clamped to the cache. The row of a key is ``page * stride_page + slot * stride_token``."""
    if PAGE == 0:
        page = tl.zeros_like(tok).to(tl.int64)
        slot = tok.to(tl.int64)
    else:
        if PAGE % BLOCK_N == 0:
            pg = tl.load(bt_row + n0 // PAGE)
        else:
            pg = tl.load(bt_row + tok // PAGE, mask=tok_ok, other=0)
        page = (tl.zeros_like(tok) + tl.minimum(tl.maximum(pg, 0), num_pages - 1)).to(tl.int64)
        slot = (tok % PAGE).to(tl.int64)
    return page, slot


@triton.jit
def _split_kernel(q, k_cache, v_cache, kv_lens, block_table, out, lse,
                  Hkv, G, HB, S, span, bound, num_pages, qk_scale2, softcap,
                  stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                  stride_lens, stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
                  D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                  SOFTCAP: tl.constexpr, WRITE_LSE: tl.constexpr, NUM_STAGES: tl.constexpr, ALIGNED: tl.constexpr,
                  PDL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program ``pid`` = ``((b * S + split) * Hkv + kv head) * HB + head block`` (the kv heads of a span are
    neighbours: together they read whole cache rows, ``Hkv * D`` wide): the q heads ``kv_head * G +
    hb * BLOCK_H + r`` (``r < BLOCK_H``, those ``< G`` real) over keys ``[split * span, (split + 1) * span)`` of
    sequence ``b`` clipped to its length; writes ``(out, lse)`` of those rows at ``split`` (``stride_os`` 0: the
    output itself). ``PAGE``: 0 for a contiguous cache (``stride_kp``: per sequence), else the page size
    (``stride_kp``: per page). ``ALIGNED``: every q, K and V stride is a multiple of 16 elements (what Triton's launcher
    specialises too), so that the tiles load as 16-byte vectors and the loop pipelines them (``cp.async``)."""
    if ALIGNED:  # (x // 16) * 16 is x here, and tells the compiler so (tl.multiple_of cannot mark an argument)
        stride_qb = stride_qb // 16 * 16
        stride_qh = stride_qh // 16 * 16
        stride_kp = stride_kp // 16 * 16
        stride_kt = stride_kt // 16 * 16
        stride_kh = stride_kh // 16 * 16
        stride_vp = stride_vp // 16 * 16
        stride_vt = stride_vt // 16 * 16
        stride_vh = stride_vh // 16 * 16
    if PDL:  # the combine may launch now: it waits (griddepcontrol.wait) for this grid to finish before reading
        gdc_launch_dependents()
    pid = tl.program_id(0)
    hb = pid % HB
    kvh = (pid // HB) % Hkv
    split = (pid // (HB * Hkv)) % S
    b = pid // (HB * Hkv * S)
    kv_len = tl.minimum(tl.maximum(tl.load(kv_lens + b * stride_lens), 0), bound)
    start = split * span
    end = tl.minimum(start + span, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    r = hb * BLOCK_H + offs_h
    row_ok = r < G
    head = kvh * G + r
    qt = tl.load(q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    if PAGE == 0:
        k_base = k_cache + b.to(tl.int64) * stride_kp + kvh * stride_kh
        v_base = v_cache + b.to(tl.int64) * stride_vp + kvh * stride_vh
    else:
        k_base = k_cache + kvh * stride_kh
        v_base = v_cache + kvh * stride_vh
    bt_row = block_table + b.to(tl.int64) * stride_btb

    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        tok = n0 + offs_n
        tok_ok = tok < end
        pg, slot = _kv_pages(bt_row, tok, tok_ok, n0, num_pages, PAGE, BLOCK_N)  # one page-id load for K and V
        rk = pg * stride_kp + slot * stride_kt
        rv = pg * stride_vp + slot * stride_vt
        k = tl.load(k_base + rk[:, None] + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
        v = tl.load(v_base + rv[:, None] + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, qt, tl.trans(k), v, tok_ok[None, :], qk_scale2, softcap, SOFTCAP,
                                    DOT_PRECISION)
    o, row_lse = finish_rows(acc, m_i, l_i)
    at = b.to(tl.int64) * stride_ob + head * stride_oh + split * stride_os
    tl.store(out + at[:, None] + offs_d[None, :], o.to(out.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        tl.store(lse + b.to(tl.int64) * stride_lb + head * stride_lh + split * stride_ls, row_lse, mask=row_ok)


@triton.jit
def _combine_kernel(parts, lses, out, lse_out, Hq, P,
                    stride_pb, stride_ph, stride_pp, stride_sb, stride_sh, stride_sp, stride_ob, stride_oh,
                    stride_lb, stride_lh,
                    D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
                    PDL: tl.constexpr):
    """Program ``(b, h)`` merges the ``P`` partials of its row, ``BLOCK_P`` at a time: a chunk in one vector step (its
    own max, weights, sum), folded into the running result with :func:`merge_step`, in part order. Parts with lse
    ``-inf`` weigh 0 whatever their values."""
    if PDL:  # launched early: wait for the kernel before (the splits) to finish and its stores to be visible
        gdc_wait()
    row = tl.program_id(0)
    b = (row // Hq).to(tl.int64)
    h = row % Hq
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    acc_lse = tl.full([1], float("-inf"), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs_p
        p_ok = p < P
        lp = tl.load(lses + b * stride_sb + h * stride_sh + p[:, None] * stride_sp, mask=p_ok[:, None],
                     other=float("-inf"))  # [BLOCK_P, 1]
        part = tl.load(parts + b * stride_pb + h * stride_ph + p[:, None] * stride_pp + offs_d[None, :],
                       mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        hi = tl.max(lp, 0)  # [1]
        hi_use = tl.where(hi == float("-inf"), 0.0, hi)
        w = tl.exp(lp - hi_use[None, :])  # 0 for empty parts
        tot = tl.sum(w, 0)
        tot_use = tl.where(tot == 0.0, 1.0, tot)
        chunk = tl.sum(tl.where(w > 0.0, part * w, 0.0), 0) / tot_use
        chunk_lse = tl.where(tot == 0.0, float("-inf"), hi_use + tl.log(tot_use))
        acc, acc_lse = merge_step(acc, acc_lse, chunk[None, :], chunk_lse)
    tl.store(out + b * stride_ob + h * stride_oh + offs_d[None, :], acc.to(out.dtype.element_ty), mask=d_ok[None, :])
    if WRITE_LSE:
        tl.store(lse_out + b * stride_lb + h * stride_lh + tl.arange(0, 1), acc_lse)


# ---------------------------------------------------------------------------------------------- host side
_workspaces: dict = {}  # (device, stream) -> fp32 workspace of the split partials, grown on demand
_retired: list = []  # outgrown workspaces, kept alive: a CUDA graph captured with one still writes into it


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """The cached fp32 workspace of this device and stream, at least ``numel`` long (grown at least 2x at a time)."""
    key = stream_key(device)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < numel:
        if ws is not None:
            _retired.append(ws)
        ws = torch.empty(max(numel, 2 * ws.numel() if ws is not None else 0, 1), dtype=torch.float32, device=device)
        _workspaces[key] = ws
    return ws


def release_workspaces() -> None:
    """Drop the cached split workspaces (also the outgrown ones kept for captured graphs: such graphs must not be
    replayed afterwards); the next call makes new ones."""
    _workspaces.clear()
    _retired.clear()


def combine_partials(parts: torch.Tensor, lses: torch.Tensor, *, out: torch.Tensor,
                     lse_out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """Merge ``P`` partial attention results per row: ``parts`` [B, Hq, P, D] fp32 (each normalised over its own keys,
    unit stride along D), ``lses`` [B, Hq, P] fp32 (natural log, ``-inf`` for a part with no keys, whose values are
    then ignored) -> ``out`` [B, Hq, D] (any of bf16 / fp16 / fp32, contiguous) and, if given, ``lse_out`` [B, Hq]
    fp32. Rows whose parts are all empty get 0 and ``-inf``. Parts merge in index order (deterministic), any ``P``.
    Returns ``out``. ``pdl`` (GPUs; ignored in the CPU world): launch with programmatic dependent launch (it waits for
    the kernel before it on the stream, whose output ``parts`` may be)."""
    what = "combine_partials"
    check_tensor(what, "parts", parts, 4, (torch.float32,))
    dev = parts.device
    b, hq, p, d = parts.shape
    check_tensor(what, "lses", lses, 3, (torch.float32,), dev, ref="parts")
    check_tensor(what, "out", out, 3, DTYPES, dev, ref="parts")
    if lse_out is not None:
        check_tensor(what, "lse_out", lse_out, 2, (torch.float32,), dev, ref="parts")
    if tuple(lses.shape) != (b, hq, p):
        raise ValueError(f"{what}: lses is {tuple(lses.shape)}, expected {(b, hq, p)} (parts' [B, Hq, P])")
    if d > 1 and parts.stride(3) != 1:
        raise ValueError(f"{what}: parts must have a unit stride along D, got strides {parts.stride()}")
    out = check_out(what, out, (b, hq, d), out.dtype, dev)
    if lse_out is not None:
        lse_out = check_out(what, lse_out, (b, hq), torch.float32, dev)
    if b * hq == 0 or d == 0:
        if lse_out is not None:
            lse_out.fill_(float("-inf"))
        return out
    if p == 0:
        out.zero_()
        if lse_out is not None:
            lse_out.fill_(float("-inf"))
        return out
    block_d = next_pow2(d)
    block_p = min(next_pow2(p), max(1, MAX_TILE_ELEMS // block_d))
    pdl = pdl and not knobs.runtime.interpret
    lse_arg = lse_out if lse_out is not None else lses
    _combine_kernel[(b * hq,)](
        parts, lses, out, lse_arg, hq, p, parts.stride(0), parts.stride(1), parts.stride(2), lses.stride(0),
        lses.stride(1), lses.stride(2), out.stride(0), out.stride(1), lse_arg.stride(0), lse_arg.stride(1),
        D=d, BLOCK_P=block_p, BLOCK_D=block_d, WRITE_LSE=lse_out is not None, PDL=pdl, num_warps=4,
        launch_pdl=pdl)
    return out


@dataclass(frozen=True)
class _Shape:
    batch: int
    hq: int
    hkv: int
    head_dim: int
    bound: int  # keys a sequence can have: T, or max_pages * page_size
    page_size: int  # 0: contiguous
    num_pages: int


def _check_inputs(what, q, k_cache, v_cache, kv_lens, block_table) -> _Shape:
    check_tensor(what, "q", q, 3, DTYPES)
    dev = q.device
    check_tensor(what, "k_cache", k_cache, 4, DTYPES, dev)
    check_tensor(what, "v_cache", v_cache, 4, DTYPES, dev)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{what}: q, k_cache and v_cache must have the same dtype, got {q.dtype}, {k_cache.dtype} "
                        f"and {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{what}: k_cache is {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)}; expected "
                         "the same shape")
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    check_heads(what, hq, hkv, d, k_cache.shape[3], v_cache.shape[3])
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{what}: {name} must have a unit stride along the head dim, got strides {t.stride()}")
    check_tensor(what, "kv_lens", kv_lens, 1, (torch.int32,), dev)
    if kv_lens.shape[0] != batch:
        raise ValueError(f"{what}: kv_lens has {kv_lens.shape[0]} entries, expected {batch} (q's batch)")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{what}: a contiguous k_cache [B, T, Hkv, D] must have q's batch {batch}, got "
                             f"{tuple(k_cache.shape)} (paged caches need block_table)")
        shape = _Shape(batch, hq, hkv, d, k_cache.shape[1], 0, 0)
    else:
        check_tensor(what, "block_table", block_table, 2, (torch.int32,), dev)
        if block_table.shape[0] != batch:
            raise ValueError(f"{what}: block_table has {block_table.shape[0]} rows, expected {batch} (q's batch)")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError(f"{what}: block_table must have a unit stride along its pages, got strides "
                             f"{block_table.stride()}")
        num_pages, page = k_cache.shape[:2]
        shape = _Shape(batch, hq, hkv, d, block_table.shape[1] * page if num_pages else 0, page, num_pages)
    if dev.type == "cpu":  # checkable without a device sync
        _check_values(what, kv_lens, block_table, shape)
    return shape


def _check_values(what, kv_lens, block_table, shape: _Shape) -> None:
    lens = kv_lens.long()
    if shape.batch and (int(lens.min()) < 0 or int(lens.max()) > shape.bound):
        raise ValueError(f"{what}: kv_lens must be in [0, {shape.bound}] (the cache's capacity per sequence), got "
                         f"{lens.tolist()}")
    if block_table is not None and shape.batch and shape.page_size:
        used = torch.arange(block_table.shape[1])[None, :] < (lens[:, None] + shape.page_size - 1) // shape.page_size
        ids = block_table.long()
        bad = used & ((ids < 0) | (ids >= shape.num_pages))
        if bool(bad.any()):
            at = bad.nonzero()[0].tolist()
            raise ValueError(f"{what}: block_table[{at[0]}, {at[1]}] = {int(ids[at[0], at[1]])} is not a page of "
                             f"the cache (0 to {shape.num_pages - 1})")


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                 block_table: torch.Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
                 return_lse: bool = False, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 config: FlashDecodeConfig | None = None):
    """Decode attention of one query token per sequence (shapes in the module docstring): ``q`` [B, Hq, D] against
    a contiguous (``block_table`` None) or paged KV cache, ``kv_lens`` [B] int32 keys per sequence; bf16, fp16 or fp32
    (all three the same dtype), head dims 64 / 128 / 256, any ``Hq % Hkv == 0`` (GQA, MQA, MHA); unit stride along the
    head dim, other strides free. Pages of any size >= 1 (a multiple of ``block_n`` keys: one page id per key tile;
    smaller or other sizes: one per key).

    ``scale``: default ``1 / sqrt(D)``; ``softcap > 0``: scores capped as ``softcap * tanh(s / softcap)`` (Gemma 2).
    Returns ``out`` [B, Hq, D] (``out_dtype``: default ``out``'s dtype if given, else q's; fp32 keeps partials that
    will be merged again, e.g. with :func:`combine_partials`), or ``(out, lse)`` with ``return_lse``: lse [B, Hq]
    fp32, natural log, ``-inf`` for an empty sequence (whose output is 0). Deterministic. fp32 inputs run their two
    products in full fp32 on GPUs (TF32 where torch allows it for matmuls: ``gemm.dot_precision``).

    ``kv_lens`` and ``block_table`` must be on q's device (a CPU copy inside a captured graph would be wrong). Their
    values are checked when they are on the CPU (the CPU world); on a GPU that would need a sync, so instead each
    length is clamped to ``[0, bound]`` inside the kernel (nothing past the cache is read) and each page id to ``[0,
    num_pages)``: an out-of-range id reads some other page (a wrong result, never a fault). Entries of
    ``block_table`` past a sequence's last page are never read.

    ``config``: a :class:`FlashDecodeConfig`; None: the autotuner's choice for the shape bucket (GPUs: the first call
    of a bucket times :func:`candidate_configs` on every rank, so make it before CUDA-graph capture), or
    :func:`default_config` where nothing is tuned. CUDA-graph capturable after a first call of the shape on the
    capturing stream (the split count comes from the bound, never from ``kv_lens``)."""
    what = "flash_decode"
    shape = _check_inputs(what, q, k_cache, v_cache, kv_lens, block_table)
    if config is not None and not isinstance(config, FlashDecodeConfig):
        raise TypeError(f"{what}: config must be a FlashDecodeConfig, got {type(config).__name__}")
    scale = default_scale(shape.head_dim, scale)
    if not math.isfinite(scale):
        raise ValueError(f"{what}: scale must be a finite float, got {scale!r}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not (0.0 <= softcap < math.inf):
        raise ValueError(f"{what}: softcap must be a finite float >= 0 (0: no capping), got {softcap!r}")
    if out_dtype is None:
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else q.dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"{what}: out_dtype must be one of {', '.join(map(str, DTYPES))}, got {out_dtype}")
    out = check_out(what, out, (shape.batch, shape.hq, shape.head_dim), out_dtype, q.device)
    lse = torch.empty((shape.batch, shape.hq), dtype=torch.float32, device=q.device) if return_lse else None
    if shape.batch * shape.hq:
        if shape.bound == 0:  # nothing can be attended
            out.zero_()
            if lse is not None:
                lse.fill_(float("-inf"))
        else:
            args = (q, k_cache, v_cache, kv_lens, block_table, out, lse, shape, scale, float(softcap))
            _launch(*args, config or _tuned_config(*args))
    return (out, lse) if return_lse else out


def _tuned_config(q, k_cache, v_cache, kv_lens, block_table, out, lse, shape: _Shape, scale, softcap):
    """The autotuner's choice for this shape bucket, or :func:`default_config` where it does not tune."""
    sms = core_sms(q.device)
    cfg_args = (shape.batch, shape.hq, shape.hkv, shape.head_dim, shape.bound, q.dtype, sms, shape.page_size or None)
    key = (str(q.dtype), shape.head_dim, shape.hq, shape.hkv, tune.bucket_pow2(shape.batch, hi=1024),
           tune.bucket_pow2(shape.bound), shape.page_size)
    return tune.choose("flash_decode", key, lambda: candidate_configs(*cfg_args), lambda: default_config(*cfg_args),
                       lambda c: _launch(q, k_cache, v_cache, kv_lens, block_table, out, lse, shape, scale, softcap, c),
                       version=KERNEL_VERSION)


def _launch(q, k_cache, v_cache, kv_lens, block_table, out, lse, shape: _Shape, scale, softcap,
            cfg: FlashDecodeConfig) -> None:
    g = shape.hq // shape.hkv
    bh = block_h(g, shape.head_dim)
    hb = triton.cdiv(g, bh)
    units = shape.batch * shape.hkv * hb
    aligned = all(s % 16 == 0 for s in q.stride()[:2] + k_cache.stride()[:3] + v_cache.stride()[:3])
    if not aligned and not knobs.runtime.interpret:
        cfg = unaligned_config(cfg, shape.head_dim)
    bt = block_table if block_table is not None else kv_lens.view(1, -1)  # never read when contiguous
    stages = kernel_stages(cfg, shape.page_size)
    pdl = cfg.pdl and not knobs.runtime.interpret

    def split_kernel(grid, dst, dst_lse, splits, span, write_lse, warmup=False):
        o_strides = dst.stride()[:3] if dst.dim() == 4 else (dst.stride(0), dst.stride(1), 0)
        l_strides = dst_lse.stride() if dst_lse.dim() == 3 else (dst_lse.stride(0), dst_lse.stride(1), 0)
        args = (q, k_cache, v_cache, kv_lens, bt, dst, dst_lse,
                shape.hkv, g, hb, splits, span, shape.bound, shape.num_pages, scale * LOG2E, softcap,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kv_lens.stride(0), bt.stride(0),
                *o_strides, *l_strides)
        meta = dict(D=shape.head_dim, BLOCK_H=bh, BLOCK_N=cfg.block_n, PAGE=shape.page_size, SOFTCAP=softcap > 0,
                    WRITE_LSE=write_lse, NUM_STAGES=stages, ALIGNED=aligned, PDL=pdl and splits > 1,
                    DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=stages)
        if warmup:
            kernel = _split_kernel.warmup(*args, grid=grid, **meta)
            return kernel.result() if hasattr(kernel, "result") else kernel  # (an asynchronous compile's future)
        _split_kernel[grid](*args, **meta)

    def partials(splits):  # [B, Hq, splits, D] and [B, Hq, splits] fp32 views of the workspace
        n = shape.batch * shape.hq * splits
        ws = _workspace(q.device, n * (shape.head_dim + 1))
        return (ws[:n * shape.head_dim].view(shape.batch, shape.hq, splits, shape.head_dim),
                ws[n * shape.head_dim:n * (shape.head_dim + 1)].view(shape.batch, shape.hq, splits))

    resident = 1
    if not (cfg.splits or cfg.programs_per_sm or knobs.runtime.interpret):  # the compiled kernel's residency
        rkey = (str(q.device), cfg, q.dtype, shape.head_dim, bh, shape.page_size, softcap > 0, aligned)
        if rkey not in _resident:  # compiled (not launched) with the operands of a 2-split call
            kernel = split_kernel((1,), *partials(2), 2, cfg.block_n, True, warmup=True)
            _resident[rkey] = resident_programs(kernel, q.device)
        resident = _resident[rkey]
    splits, span = split_plan(cfg, units, shape.bound, core_sms(q.device), resident)
    if splits == 1:
        split_kernel((units,), out, lse if lse is not None else out, 1, span, lse is not None)
        return
    parts, lses = partials(splits)
    split_kernel((units * splits,), parts, lses, splits, span, True)
    combine_partials(parts, lses, out=out, lse_out=lse, pdl=pdl)


def flash_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                           block_table: torch.Tensor | None = None, scale: float | None = None,
                           softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(out [B, Hq, D], lse [B, Hq])`` of :func:`flash_decode`'s inputs, one sequence at a time through
    :func:`~._common.attention_rows_reference` (pages gathered with torch indexing; reads ``kv_lens`` and
    ``block_table`` on the host)."""
    scale = default_scale(q.shape[-1], scale)
    outs, lses = [], []
    lens = kv_lens.tolist()
    for b, n in enumerate(lens):
        if block_table is None:
            k, v = k_cache[b, :n], v_cache[b, :n]
        else:
            page = k_cache.shape[1]
            ids = block_table[b, :triton.cdiv(n, page)].long()
            k = k_cache[ids].flatten(0, 1)[:n]
            v = v_cache[ids].flatten(0, 1)[:n]
        o, s = attention_rows_reference(q[b:b + 1], k, v, scale=scale, softcap=softcap)
        outs.append(o[0])
        lses.append(s[0])
    return torch.stack(outs), torch.stack(lses)
