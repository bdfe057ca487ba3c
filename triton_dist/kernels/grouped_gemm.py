"""The grouped core: one GEMM per expert over expert-sorted rows, ``out[rows of e] = x[rows of e] @ W_e``, one launch.

Layout contract:

* ``x`` [R, K], contiguous: rows sorted by expert, expert ``e``'s rows at ``expert_offsets[e]:expert_offsets[e+1]``
  (``expert_offsets`` [E+1], int32 or int64, non-decreasing, on ``x``'s device; zero rows allowed; e.g.
  :func:`~triton_dist.kernels.routing.build_routing`'s ``expert_offsets`` or ``padded_offsets``);
* ``w`` [E, K, N] (``w_layout="ekn"``) or [E, N, K] (``"enk"``, HF expert weights stored out x in), any strides;
* ``out`` [R, N], contiguous, ``x``'s dtype; rows outside every expert's range (before ``expert_offsets[0]``, at or
  after ``expert_offsets[E]``) are never written. bf16, fp16 or fp32; fp32 accumulation.

Scheduling without a host sync. The host knows R, E and the block sizes, not the rows per expert, so it launches a grid
from a bound that needs no data: expert ``e`` has ``cdiv(n_e, BLOCK_M)`` row tiles, at most
``min((R + A * (BLOCK_M - 1)) // BLOCK_M, R)`` of them in all (``A = min(E, R)`` experts can have rows), times
``cdiv(N, BLOCK_N)`` column tiles, times ``SPLIT_K``. Every program loads the E+1 offsets itself, computes each
expert's row tiles and their inclusive prefix sum (``tl.cumsum``) in registers, and walks tile indices
``pid, pid + nprog, ...`` below the real total (computed on the device): tile -> (row tile, column tile) in grouped
order (:func:`~triton_dist.kernels.gemm.grouped_tile`, so row tiles sharing a weight column block run together),
row tile -> expert by counting the experts whose tiles end at or before it (a vector compare and sum over E lanes).
Programs past the total exit. ``persistent`` configs launch ``num_sms`` programs (prefill); the others one program per
tile of the bound (decode, where the bound is small and a second resident program hides the first one's drain).

Operands: TMA descriptors when the layouts allow (``x`` row-major; the weights as a 3-D descriptor over [E, K, N] with
block ``[1, BLOCK_K, BLOCK_N]``, or over [E, N, K] with block ``[1, BLOCK_N, BLOCK_K]``, so a tile never reads past
its expert's K or N: out-of-range reads are zeros), plain pointers otherwise
(:func:`~triton_dist.kernels.gemm.tile_dot_span`). A row tile's descriptor loads of ``x`` may read the next expert's
rows; the masked epilogue store (:func:`~triton_dist.kernels.gemm.store_tile`) never writes them.

Split-K (decode-size groups on few experts, where ``E_active x cdiv(N, BLOCK_N)`` tiles do not fill the GPU): each
split stores an fp32 partial in a workspace and counts itself on the tile's counter (acq_rel); the last split sums the
partials in split order (deterministic), stores the tile and resets the counter. No program waits for another, so the
CPU world's one-at-a-time programs finish too. Workspace and counters are cached per (device, stream).

Configs: :class:`GroupedGemmConfig` (frozen); :func:`default_config` (large tiles and a persistent grid for prefill
groups; for decode groups small row tiles, one program per tile, and split K where the tiles are few);
:func:`candidate_configs` for an autotuner.
References: :func:`grouped_gemm_reference` (per-expert fp32 ``torch.matmul``) and :func:`torch_grouped_mm`
(``torch._grouped_mm``, the baseline). No world is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

from triton_dist import tune
from .gemm import (DTYPES, check_config, check_out, core_sms, dot_precision, grouped_tile,
                   split_k_finish, split_k_scratch, tile_dot_span, wave_split)

W_LAYOUTS = ("ekn", "enk")
DECODE_ROWS = 128  # rows per expert up to which the decode configs apply
MIN_K_TILES = 4  # a K split streams at least this many K tiles
KERNEL_VERSION = "2"  # the autotuner's cache key: bump when the kernel changes
_MAX_ROWS = 2**31 - 1


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GroupedGemmConfig:
    """Tile shape, K split and launch parameters of :func:`grouped_gemm`. Blocks are powers of two >= 16.

    ``persistent``: ``num_sms`` programs walk the tiles; otherwise one program per tile of the data-free bound."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    split_k: int = 1
    num_stages: int = 3
    num_warps: int = 8
    use_tma: bool = True
    persistent: bool = True

    def __post_init__(self):
        check_config(self, ("group_m", "split_k", "num_stages"))


# The interpreter costs ~0.1 ms per op per program: few, mid-sized tiles.
CPU_CONFIG = GroupedGemmConfig(block_m=16, block_n=32, block_k=32, group_m=2, split_k=1, num_stages=1, num_warps=4)


def _smem(cfg: GroupedGemmConfig, elem: int) -> int:
    return (cfg.block_m + cfg.block_n) * cfg.block_k * elem * cfg.num_stages


def _split_for(tiles: int, k_tiles: int, sms: int) -> int:
    return wave_split(tiles, k_tiles, sms, MIN_K_TILES)


def _decode_block_m(rows_per_expert: int) -> int:
    """Row tile of decode-size groups: the rows rounded up to a power of two in 16-64, 128 above 64 rows (with 8
    warps: 64-row tiles took 1.6x torch._grouped_mm's time at 128 rows per expert, E=8 K=4096 N=1792, on an H200)."""
    return 128 if rows_per_expert > 64 else min(64, max(16, triton.next_power_of_2(max(rows_per_expert, 1))))


def default_config(dtype: torch.dtype, rows_per_expert_hint: int, *, n: int, k: int, active_experts: int,
                   sms: int) -> GroupedGemmConfig:
    """A config without tuning for experts of about ``rows_per_expert_hint`` rows each, ``active_experts`` of them
    with rows, ``[*, k] @ [k, n]`` per expert, on ``sms`` SMs (the CPU world: :data:`CPU_CONFIG`)."""
    if knobs.runtime.interpret:
        return CPU_CONFIG
    fp32 = dtype == torch.float32
    if rows_per_expert_hint > DECODE_ROWS:
        if fp32:
            return GroupedGemmConfig(128, 128, 32, group_m=8, num_stages=3, num_warps=8)
        return GroupedGemmConfig(128, 256, 64, group_m=8, num_stages=3, num_warps=8)
    block_m = _decode_block_m(rows_per_expert_hint)
    block_n, block_k = (64, 64) if fp32 else (128, 128 if block_m < 128 else 64)
    tiles = max(1, active_experts) * triton.cdiv(rows_per_expert_hint, block_m) * triton.cdiv(n, block_n)
    split = _split_for(tiles, triton.cdiv(k, block_k), sms)
    return GroupedGemmConfig(block_m, block_n, block_k, group_m=8, split_k=split, num_stages=3,
                             num_warps=8 if block_m == 128 else 4, persistent=False)


def candidate_configs(dtype: torch.dtype, rows_per_expert_hint: int, *, n: int, k: int, active_experts: int,
                      sms: int) -> list[GroupedGemmConfig]:
    """Configs an autotuner may time for this shape, :func:`default_config`'s among them (shared memory <= 200 KiB)."""
    elem = torch.empty((), dtype=dtype).element_size()
    fp32 = dtype == torch.float32
    out = [default_config(dtype, rows_per_expert_hint, n=n, k=k, active_experts=active_experts, sms=sms)]
    if rows_per_expert_hint > DECODE_ROWS:
        for block_m in (64, 128):
            for block_n in (64, 128) if fp32 else (128, 256):
                for stages in (3, 4):
                    for warps, persistent in ((4, False), (8, True), (8, False)):
                        out.append(GroupedGemmConfig(block_m, block_n, 32 if fp32 else 64, group_m=8,
                                                     num_stages=stages, num_warps=warps, persistent=persistent))
    else:
        block_m = _decode_block_m(rows_per_expert_hint)
        for block_n in (64, 128, 256):
            for block_k in (64, 128) if fp32 else (64, 128, 256):
                tiles = max(1, active_experts) * triton.cdiv(rows_per_expert_hint, block_m) * triton.cdiv(n, block_n)
                base = _split_for(tiles, triton.cdiv(k, block_k), sms)
                for split in sorted({max(1, base // 2), base, base * 2}):
                    if triton.cdiv(triton.cdiv(k, block_k), split) < 2:
                        continue
                    for stages in (3, 4):
                        out.append(GroupedGemmConfig(block_m, block_n, block_k, group_m=8, split_k=split,
                                                     num_stages=stages, num_warps=8 if block_m == 128 else 4,
                                                     persistent=False))
    seen, cands = set(), []
    for c in out:
        if c not in seen and (_smem(c, elem) <= 200 << 10 or c is out[0]):
            seen.add(c)
            cands.append(c)
    return cands


def max_row_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """An upper bound on ``sum_e cdiv(n_e, block_m)`` over experts of ``n_e >= 0`` rows summing to at most
    ``rows``, from the sizes alone: only ``min(E, rows)`` experts can have rows, and each has >= 1 row per tile."""
    active = min(num_experts, rows)
    return min((rows + active * (block_m - 1)) // block_m, rows)


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def expert_row_tiles(offs_ptr, E, R, E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Every expert's rows ``[lo, hi)`` (clamped to ``[0, R]``, so bad offsets cannot address memory outside ``x``)
    and its row tiles ``[first, end)`` in the concatenation of all experts' row tiles, as ``E_BLOCK``-lane vectors
    (lanes ``>= E``: no rows, no tiles). Example, BLOCK_M=16, offsets [0, 20, 20, 37]: lo [0, 20, 20], hi
    [20, 20, 37], tiles [2, 0, 2], first [0, 2, 2], end [2, 2, 4]."""
    e = tl.arange(0, E_BLOCK)
    live = e < E
    lo = tl.load(offs_ptr + e, mask=live, other=0).to(tl.int32)
    hi = tl.load(offs_ptr + e + 1, mask=live, other=0).to(tl.int32)
    lo = tl.minimum(tl.maximum(lo, 0), R)
    hi = tl.minimum(tl.maximum(hi, lo), R)
    tiles = tl.where(live, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    end = tl.cumsum(tiles, 0)
    return lo, hi, end - tiles, end


@triton.jit
def expert_of_tile(gm, lo, hi, first, end, E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end of the expert's rows) of row tile ``gm`` (of :func:`expert_row_tiles`' numbering):
    the expert is the number of experts whose tiles end at or before ``gm`` (empty experts end where the previous
    one does, so they are skipped)."""
    e = tl.sum((end <= gm).to(tl.int32), 0)
    sel = tl.arange(0, E_BLOCK) == e
    row0 = tl.sum(tl.where(sel, lo, 0), 0) + (gm - tl.sum(tl.where(sel, first, 0), 0)) * BLOCK_M
    return e, row0, tl.sum(tl.where(sel, hi, 0), 0)


@triton.jit
def _expert_dot_tma(x_desc, w_desc, e, off_m, off_n, kt_lo, kt_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, W_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``x[off_m:+BM, K tiles kt_lo..kt_hi] @ W_e[.., off_n:+BN]`` through descriptors: ``x_desc`` over [R, K]
    (block [BM, BK]), ``w_desc`` over [E, K, N] (block [1, BK, BN]) or, with ``W_TRANS``, [E, N, K] ([1, BN, BK])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        k = kt * BLOCK_K
        a = x_desc.load([off_m, k])
        if W_TRANS:
            b = w_desc.load([e, off_n, k]).reshape(BLOCK_N, BLOCK_K).T
        else:
            b = w_desc.load([e, k, off_n]).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _grouped_gemm_kernel(x, w, out, offs_ptr, ws_ptr, count_ptr, R, N, K, E,
                         stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                         row_tile_bound, kt_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         SPLIT_K: tl.constexpr, E_BLOCK: tl.constexpr, USE_TMA: tl.constexpr,
                         W_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    lo, hi, first, end = expert_row_tiles(offs_ptr, E, R, E_BLOCK, BLOCK_M)
    tiles_m = tl.minimum(tl.max(end, 0), row_tile_bound)  # the bound holds for valid offsets; memory safety else
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for t in range(tl.program_id(0), tiles_m * tiles_n * SPLIT_K, tl.num_programs(0)):
        tile = t // SPLIT_K
        split = t % SPLIT_K
        gm, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        e, off_m, rows_end = expert_of_tile(gm, lo, hi, first, end, E_BLOCK, BLOCK_M)
        off_n = pid_n * BLOCK_N
        kt_lo = split * kt_per_split
        kt_hi = tl.minimum(kt_lo + kt_per_split, k_tiles)
        if USE_TMA:
            acc = _expert_dot_tma(x, w, e, off_m, off_n, kt_lo, kt_hi, BLOCK_M, BLOCK_N, BLOCK_K, W_TRANS,
                                  DOT_PRECISION)
        else:
            acc = tile_dot_span(x, w + e.to(tl.int64) * stride_we, off_m, off_n, rows_end, N, K, kt_lo, kt_hi,
                                stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, False, False,
                                DOT_PRECISION)
        split_stride = (row_tile_bound * tiles_n).to(tl.int64) * (BLOCK_M * BLOCK_N)
        split_k_finish(out, acc, ws_ptr, count_ptr, tile, split, split_stride, off_m, off_n, rows_end, N,
                       stride_om, stride_on, BLOCK_M, BLOCK_N, SPLIT_K)


# ---------------------------------------------------------------------------------------------- host side
def _tma_ok(t: torch.Tensor) -> bool:
    """``t`` can back a TMA descriptor: unit last stride, 16-byte aligned base and other strides, no empty dim."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s > 0 for s in t.shape)
            and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1]))


def _operands(x: torch.Tensor, wk: torch.Tensor, cfg: GroupedGemmConfig):
    """``(x_arg, w_arg, use_tma, w_trans)`` for ``x`` [R, K] and the logical [E, K, N] weights ``wk``."""
    if cfg.use_tma and _tma_ok(x):
        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.block_m, cfg.block_k])
        if _tma_ok(wk):
            return x_desc, TensorDescriptor(wk, list(wk.shape), list(wk.stride()),
                                            [1, cfg.block_k, cfg.block_n]), True, False
        wt = wk.transpose(1, 2)  # [E, N, K]
        if _tma_ok(wt):
            return x_desc, TensorDescriptor(wt, list(wt.shape), list(wt.stride()),
                                            [1, cfg.block_n, cfg.block_k]), True, True
    return x, wk, False, False


def _check_offsets_values(what: str, offs: torch.Tensor, rows: int) -> None:
    """Host check of the offsets' values: CPU tensors only (on GPUs it would sync; the kernel clamps instead)."""
    if offs.device.type != "cpu" or not offs.numel():
        return
    v = offs.tolist()
    if v[0] < 0 or v[-1] > rows or any(b < a for a, b in zip(v, v[1:])):
        raise ValueError(f"{what}: expert_offsets must be non-decreasing from >= 0 to <= {rows} (the rows of x), "
                         f"got {v if len(v) <= 16 else str(v[:16])[:-1] + ', ...]'}")


def _check_args(what: str, x, w, expert_offsets, w_layout):
    for name, t in (("x", x), ("w", w), ("expert_offsets", expert_offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"{what}: w_layout must be one of {W_LAYOUTS}, got {w_layout!r}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D [rows, K], got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"{what}: w must be 3-D [E, K, N] ('ekn') or [E, N, K] ('enk'), got shape {tuple(w.shape)}")
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}; expected bfloat16, float16 or float32")
    if x.dtype != w.dtype:
        raise TypeError(f"{what}: x and w must have the same dtype, got {x.dtype} and {w.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{what}: x must be contiguous (call .contiguous() first)")
    if x.shape[0] > _MAX_ROWS:
        raise ValueError(f"{what}: x has {x.shape[0]} rows; at most {_MAX_ROWS}")
    e = w.shape[0]
    k = w.shape[1] if w_layout == "ekn" else w.shape[2]
    if x.shape[1] != k:
        raise ValueError(f"{what}: x is {tuple(x.shape)} and w ({w_layout}) is {tuple(w.shape)}; expected K = "
                         f"{x.shape[1]} at w.shape[{1 if w_layout == 'ekn' else 2}]")
    if expert_offsets.dtype not in (torch.int32, torch.int64) or tuple(expert_offsets.shape) != (e + 1,):
        raise ValueError(f"{what}: expert_offsets must be an int32 or int64 [{e + 1}] tensor (E + 1 for E = "
                         f"{e} experts), got {tuple(expert_offsets.shape)} {expert_offsets.dtype}")
    for name, t in (("w", w), ("expert_offsets", expert_offsets)):
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device}, x on {x.device}; expected one device")
    _check_offsets_values(what, expert_offsets, x.shape[0])


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, *, out: torch.Tensor | None = None,
                 w_layout: str = "ekn", config: GroupedGemmConfig | None = None) -> torch.Tensor:
    """``out[o_e:o_{e+1}] = x[o_e:o_{e+1}] @ W_e`` for every expert ``e`` (``o = expert_offsets``), in one launch with
    no host sync (see the module docstring for the layout contract). Returns ``out`` ([R, N], ``x``'s dtype; a new
    tensor when None); rows outside ``[o_0, o_E)`` are left as they were. ``config``: a :class:`GroupedGemmConfig`;
    None: the autotuner's choice for ``R / E`` rows per expert (``triton_dist.tune``: collective at the first call of
    a shape bucket on GPUs; make it before CUDA-graph capture), :func:`default_config` where nothing is tuned."""
    what = "grouped_gemm"
    _check_args(what, x, w, expert_offsets, w_layout)
    rows, k = x.shape
    e = w.shape[0]
    wk = w if w_layout == "ekn" else w.transpose(1, 2)  # logical [E, K, N]
    n = wk.shape[2]
    out = check_out(what, out, (rows, n), x.dtype, x.device)
    if config is not None and not isinstance(config, GroupedGemmConfig):
        raise TypeError(f"{what}: config must be a GroupedGemmConfig, got {type(config).__name__}")
    if rows == 0 or n == 0 or e == 0:
        return out
    if config is None:
        config = _tuned_config(x, w, wk, expert_offsets, out, w_layout)
    _launch(x, wk, expert_offsets, out, config)
    return out


def _tuned_config(x, w, wk, expert_offsets, out, w_layout) -> GroupedGemmConfig:
    """The autotuner's choice (``triton_dist.tune``) for this shape bucket: the rows per expert ``R / E`` (from the
    host-known sizes, never the offsets: no sync), E, N, K and the weight layout; :func:`default_config` where nothing
    is tuned (the CPU world, ``TRITON_DIST_AUTOTUNE=0``, no world)."""
    rows, k = x.shape
    e, n = wk.shape[0], wk.shape[2]
    hint = triton.cdiv(rows, e)
    kw = dict(n=n, k=k, active_experts=min(e, rows))
    return tune.choose("grouped_gemm", (str(x.dtype), tune.bucket_pow2(hint), e, n, k, w_layout, w.stride(-1) == 1),
                       lambda: candidate_configs(x.dtype, hint, sms=core_sms(x.device), **kw),
                       lambda: default_config(x.dtype, hint, sms=core_sms(x.device), **kw),
                       lambda c: _launch(x, wk, expert_offsets, out, c), version=KERNEL_VERSION)


def _launch(x, wk, expert_offsets, out, cfg: GroupedGemmConfig) -> None:
    rows, k = x.shape
    e, n = wk.shape[0], wk.shape[2]
    sms = core_sms(x.device)
    bound_m = max_row_tiles(rows, e, cfg.block_m)
    tiles_n = triton.cdiv(n, cfg.block_n)
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, k_tiles))
    kt_per_split = max(1, triton.cdiv(k_tiles, split))
    split = max(1, triton.cdiv(k_tiles, kt_per_split))  # no empty split
    bound = bound_m * tiles_n * split
    grid = min(bound, sms) if cfg.persistent else bound
    ws, counts = split_k_scratch(x.device, bound_m * tiles_n * split * cfg.block_m * cfg.block_n if split > 1 else 1,
                                 bound_m * tiles_n if split > 1 else 1)
    x_arg, w_arg, use_tma, w_trans = _operands(x, wk, cfg)
    _grouped_gemm_kernel[(grid,)](
        x_arg, w_arg, out, expert_offsets.contiguous(), ws, counts, rows, n, k, e,
        x.stride(0), x.stride(1), wk.stride(0), wk.stride(1), wk.stride(2), out.stride(0), out.stride(1),
        bound_m, kt_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
        E_BLOCK=max(2, triton.next_power_of_2(e)), USE_TMA=use_tma, W_TRANS=w_trans,
        DOT_PRECISION=dot_precision(x.dtype), num_stages=cfg.num_stages, num_warps=cfg.num_warps)


# ---------------------------------------------------------------------------------------------- references
def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                           w_layout: str = "ekn") -> torch.Tensor:
    """A loop of fp32 ``torch.matmul`` per expert (host sync: reads the offsets), cast to ``x``'s dtype; rows outside
    every expert are zero."""
    wk = w if w_layout == "ekn" else w.transpose(1, 2)
    out = torch.zeros((x.shape[0], wk.shape[2]), dtype=x.dtype, device=x.device)
    offs = expert_offsets.tolist()
    for e in range(wk.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = (x[lo:hi].float() @ wk[e].float()).to(x.dtype)
    return out


def torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, w_layout: str = "ekn"):
    """``torch._grouped_mm`` on the same arguments (the baseline): ``(out, None)``, or ``(None, reason)`` where torch
    lacks it or refuses the dtype / layout.

    ``torch._grouped_mm(x, mat_b [E, K, N], offs=...)`` takes ``offs`` [E] int32, the *end* row of each group, the first
    group starting at row 0: ``expert_offsets[1:]`` (so ``expert_offsets[0]`` must be 0). Its fast (CUTLASS) path is
    bf16 on sm90+; recent torch (pytorch#162059) runs fp16 / fp32 on a slow fallback. ``"enk"`` weights go in as
    ``w.transpose(-2, -1)`` (column-major per expert, accepted as is). Rows past ``offs[-1]`` are unspecified."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None, f"torch {torch.__version__} has no torch._grouped_mm"
    if w_layout not in W_LAYOUTS:
        return None, f"w_layout {w_layout!r} is not one of {W_LAYOUTS}"
    wk = w if w_layout == "ekn" else w.transpose(-2, -1)
    try:
        return fn(x, wk, offs=expert_offsets[1:].to(torch.int32)), None
    except (RuntimeError, TypeError, ValueError) as e:
        return None, f"torch._grouped_mm refused {x.dtype} x {tuple(x.shape)} @ {w_layout} {tuple(w.shape)}: " \
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
