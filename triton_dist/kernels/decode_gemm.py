"""The decode core: ``a @ b`` for few rows (M from 1 to a few hundred), bound by reading the weights ``b``.

At decode a projection multiplies M = batch rows (1-256) by a weight of K x N (``b = w.t()`` of an ``nn.Linear``
weight ``w`` [N, K], or a row-major K x N). Every weight byte is read once, so the floor is ``K * N * elem / HBM
bandwidth`` (Qwen3-8B's 4096 -> 24576 gate/up in bf16: 201 MB, 47 us at 4.3 TB/s). A dense GEMM tiled for large M
launches ``cdiv(N, 256)`` programs there (96 for that shape, fewer for the down projection), too few to keep 132 SMs
streaming; this kernel splits K as well:

* work unit ``u`` of ``tiles * SPLIT_K`` computes output tile ``u // SPLIT_K`` over the K tiles of split
  ``u % SPLIT_K`` (:func:`~triton_dist.kernels.gemm.tile_dot_span`), so that many units share the weight stream;
  the row tiles of one column block are neighbours (they read the same weights, from L2 after the first); one
  program per unit, or (``persistent``) one per SM walking the units in one flattened pipeline;
* ``SPLIT_K == 1``: the unit stores its tile;
* ``SPLIT_K > 1``: it stores its fp32 partial in a workspace, then counts itself on the tile's counter (a barrier,
  then an acq_rel atomic); the last of the ``SPLIT_K`` units of a tile sums the partials **in split order**
  (deterministic: the same bits for the same inputs on every call and every rank), stores the tile and resets the
  counter to 0 for the next call. One launch, no host sync, no per-call allocation once the buffers exist: CUDA-graph
  capturable after a first call on the capturing stream's device.

Workspace and counters are cached per (device, stream), so calls on one stream run in order. In the CPU world the
programs run one after another in pid order, so the last split of a tile is always the one that reduces.

Configs (:class:`DecodeGemmConfig`): ``split_k``, block sizes and ``persistent`` (one program per SM walking the
work units in a flattened pipeline instead of one program per unit); :func:`default_config` picks the split whose
programs fill their waves of SMs best, each split at least ``MIN_K_TILES`` K tiles; :func:`candidate_configs` lists
what an autotuner may try.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from triton_dist import tune
from .gemm import (check_config, check_operands, check_out, core_sms, dot_precision, operands,
                   split_k_finish, split_k_scratch, tile_dot_span, wave_split)

MAX_M = 256  # the decode regime; larger M belongs to the dense core
MIN_K_TILES = 4  # a split streams at least this many K tiles, so its prologue and epilogue stay small
KERNEL_VERSION = "4"  # the autotuner's cache key: bump when the kernel changes


@dataclass(frozen=True)
class DecodeGemmConfig:
    """Tile shape, K split and launch parameters of :func:`decode_gemm`. Blocks are powers of two >= 16."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_stages: int = 4
    num_warps: int = 4
    use_tma: bool = True
    persistent: bool = False  # one program per SM walking the (tile, split) units in one flattened pipeline

    def __post_init__(self):
        check_config(self, ("split_k", "num_stages"))


# The interpreter costs ~0.1 ms per op per program: few, mid-sized tiles (split 2 keeps the reduction path tested).
CPU_CONFIG = DecodeGemmConfig(block_m=16, block_n=32, block_k=32, split_k=2, num_stages=1, num_warps=4)


def _block_m(m: int) -> int:
    """Row tile: the rows rounded up to a power of two in 16-64; 128 above 64 rows (M=128 and 256 are compute-bound
    enough on an H200 that cuBLAS-like 128-row tiles and 8 warps matter: 64 x 64 tiles took 2x cuBLAS's time at
    M=128 N=24576 K=4096)."""
    return 128 if m > 64 else min(64, max(16, triton.next_power_of_2(m)))


def _split_for(tiles: int, k_tiles: int, sms: int) -> int:
    return wave_split(tiles, k_tiles, sms, MIN_K_TILES)


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> DecodeGemmConfig:
    """A config for an ``m x k @ k x n`` product on ``sms`` SMs without tuning (the CPU world: :data:`CPU_CONFIG`)."""
    if knobs.runtime.interpret:
        return CPU_CONFIG
    block_m = _block_m(m)
    if block_m == 128:  # the dense core's tile, split only where the tiles do not fill the SMs
        block_n, block_k, warps = 128, 64, 8
    else:
        block_n, block_k, warps = (64 if m <= 64 else 128), (256 if m <= 16 and dtype != torch.float32 else 128), 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split_for(tiles, triton.cdiv(k, block_k), sms)
    return DecodeGemmConfig(block_m, block_n, block_k, split, num_stages=_stages(block_m, block_n, block_k, dtype),
                            num_warps=warps)


SMEM_BUDGET = 200 << 10  # of the H100/H200's 227 KB per block, leaving room for the epilogue's scratch


def _stages(block_m: int, block_n: int, block_k: int, dtype: torch.dtype, most: int = 5) -> int:
    """Pipeline stages whose A and B tiles fit :data:`SMEM_BUDGET`."""
    per_stage = (block_m + block_n) * block_k * torch.empty((), dtype=dtype).element_size()
    return max(1, min(most, SMEM_BUDGET // per_stage))


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list[DecodeGemmConfig]:
    """Configs an autotuner may time for this shape: block N x block K x split around :func:`default_config`'s
    (above 64 rows also 128-row tiles: block N 128 or 256, 8 warps)."""
    # block N 32 only where N is small (more column tiles: QKV / O of an 8B model, 6144 / 4096 columns, were the
    # shapes where cuBLAS stayed ahead); 64-wide 128-row tiles for the same reason above 64 rows
    few = n <= 8192
    narrow = [(min(64, _block_m(m)), bn, bk, 4) for bn in ((32, 64, 128) if few else (64, 128))
              for bk in ((64, 128) if dtype == torch.float32 else (128, 256))]
    wide = [(128, bn, bk, 8) for bn in ((64, 128, 256) if few else (128, 256))
            for bk in ((32, 64) if dtype == torch.float32 else (64, 128))]
    # above 64 rows both: 128-row tiles won where N is large (gate/up, LM head at M=128), 64-row ones where it is
    # small (O, down); measured on an H200, docs/perf/NOTES.md "Decode core"
    shapes = (wide + narrow) if _block_m(m) == 128 else narrow
    out = []
    for block_m, block_n, block_k, warps in shapes:  # each new candidate is a compile (~1 s) at the first tuning
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        base = _split_for(tiles, triton.cdiv(k, block_k), sms)
        for split in sorted({max(1, base // 2), base, base * 2}):
            if triton.cdiv(triton.cdiv(k, block_k), split) < 2:
                continue
            stages = _stages(block_m, block_n, block_k, dtype)
            out.append(DecodeGemmConfig(block_m, block_n, block_k, split, stages, warps))
            if block_m < 128 and tiles * split > sms:  # more units than SMs: a persistent walk may beat the waves
                out.append(DecodeGemmConfig(block_m, block_n, block_k, split, stages, warps, persistent=True))
    return out


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _decode_gemm_kernel(a, b, c, ws_ptr, count_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                        stride_cm, stride_cn, kt_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, USE_TMA: tl.constexpr, B_TRANS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False, PERSISTENT: tl.constexpr = False):
    """Work unit ``u`` is split ``u % SPLIT_K`` of output tile ``u // SPLIT_K`` (the row tiles of one column block
    are neighbours: they read the same weights). One unit per program, or with ``PERSISTENT`` a program per SM
    walking units ``pid, pid + nprog, ...`` in one flattened loop (the weight stream's pipeline fills once per
    program, not once per unit)."""
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel before, whose output may be A (and
        # whose split-K scratch and counters may be ours), then let the next kernel launch in turn
        gdc_wait()
        gdc_launch_dependents()
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tiles_m * tl.cdiv(N, BLOCK_N)
    split_stride = tiles.to(tl.int64) * (BLOCK_M * BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for u in tl.range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0), flatten=PERSISTENT):
        tile = u // SPLIT_K
        split = u % SPLIT_K
        pid_m = tile % tiles_m
        pid_n = tile // tiles_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        kt_lo = split * kt_per_split
        kt_hi = tl.minimum(kt_lo + kt_per_split, k_tiles)
        acc = tile_dot_span(a, b, off_m, off_n, M, N, K, kt_lo, kt_hi, stride_am, stride_ak, stride_bk, stride_bn,
                            BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, B_TRANS, DOT_PRECISION)
        split_k_finish(c, acc, ws_ptr, count_ptr, tile, split, split_stride, off_m, off_n, M, N, stride_cm,
                       stride_cn, BLOCK_M, BLOCK_N, SPLIT_K)


# ---------------------------------------------------------------------------------------------- host side
def check_decode_operands(what: str, a, b) -> None:
    """:func:`~triton_dist.kernels.gemm.check_operands` on ``a``'s device (no world needed), and 1 to :data:`MAX_M`
    rows."""
    check_operands(what, a, b, a.device if isinstance(a, torch.Tensor) else None)
    if not 1 <= a.shape[0] <= MAX_M:
        raise ValueError(f"{what}: a has {a.shape[0]} rows; the decode core takes 1 to {MAX_M} (larger M: the "
                         "dense core, e.g. torch.matmul or ops.ag_gemm at world size 1)")


def decode_gemm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None,
                config: DecodeGemmConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """``a @ b`` for ``a`` of 1 to :data:`MAX_M` rows: ``a`` (M x K) contiguous, ``b`` (K x N) row-major or
    ``w.t()`` of a row-major ``w`` (N x K, an ``nn.Linear`` weight) or any strides (pointer path); bf16, fp16 or
    fp32, fp32 accumulation. Returns ``out`` (M x N, contiguous, ``a``'s dtype; a new tensor when None).

    Deterministic: the K splits are summed in a fixed order, so equal inputs give equal bits. ``config``: a
    :class:`DecodeGemmConfig`; None: the autotuner's choice for the shape (``triton_dist.tune``: on GPUs the first
    call of a shape bucket times :func:`candidate_configs` on every rank, collectively, so every rank must make it:
    call once per shape before CUDA-graph capture), or :func:`default_config` where nothing is tuned (the CPU world,
    ``TRITON_DIST_AUTOTUNE=0``, no ``triton_dist.init()``). No world is needed.

    ``pdl=True`` (GPUs; ignored in the CPU world): launch with programmatic dependent launch, so the kernel's programs
    may be scheduled while the previous kernel on the stream drains; they wait for it (``griddepcontrol.wait``)
    before touching memory, so any producer of ``a`` is safe. For sequences of kernels (a captured decode step).
    Measured on an H200 (docs/perf/NOTES.md, "Compute cores", fifth session): 0.3-0.6 us faster for one-wave
    kernels (small shards, O), 2-25 % slower for multi-wave ones (the next kernel's programs take SMs while this
    one still has waves to run), so it stays off by default."""
    what = "decode_gemm"
    check_decode_operands(what, a, b)
    m, k = a.shape
    n = b.shape[1]
    out = check_out(what, out, (m, n), a.dtype, a.device)
    if config is not None and not isinstance(config, DecodeGemmConfig):
        raise TypeError(f"{what}: config must be a DecodeGemmConfig, got {type(config).__name__}")
    if n == 0:
        return out
    if k == 0:  # an empty sum
        return out.zero_()
    _launch(a, b, out, config or _tuned_config(a, b, out), pdl=pdl and not knobs.runtime.interpret)
    return out


def _tuned_config(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> DecodeGemmConfig:
    """The autotuner's choice for this shape bucket (``triton_dist.tune``: measured once per world on GPUs, then a
    lookup), or :func:`default_config` where it does not tune (the CPU world, ``TRITON_DIST_AUTOTUNE=0``, no world)."""
    m, k = a.shape
    n = b.shape[1]
    layout = "row" if b.stride(1) == 1 else "t" if b.stride(0) == 1 else "strided"
    return tune.choose("decode_gemm", (str(a.dtype), tune.bucket_pow2(m, hi=MAX_M), n, k, layout),
                       lambda: candidate_configs(m, n, k, a.dtype, core_sms(a.device)),
                       lambda: default_config(m, n, k, a.dtype, core_sms(a.device)),
                       lambda c: _launch(a, b, out, c), version=KERNEL_VERSION)


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: DecodeGemmConfig, pdl: bool = False) -> None:
    m, k = a.shape
    n = b.shape[1]
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = min(cfg.split_k, k_tiles)
    kt_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, kt_per_split)  # no empty split
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    ws, counts = split_k_scratch(a.device, tiles * split * cfg.block_m * cfg.block_n if split > 1 else 1, tiles)
    a_arg, b_arg, use_tma, b_trans = operands(a, b, cfg)
    units = tiles * split
    _decode_gemm_kernel[(min(units, core_sms(a.device)) if cfg.persistent else units,)](
        a_arg, b_arg, out, ws, counts, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), kt_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, USE_TMA=use_tma,
        B_TRANS=b_trans, DOT_PRECISION=dot_precision(a.dtype), PDL=pdl, PERSISTENT=cfg.persistent,
        num_stages=cfg.num_stages,
        num_warps=cfg.num_warps, launch_pdl=pdl)


def decode_gemm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` (cuBLAS on GPUs: the baseline)."""
    return torch.matmul(a, b)
