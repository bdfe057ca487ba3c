"""GEMM building blocks shared by the overlapped ops (``ag_gemm``, ``gemm_rs``, ``gemm_ar``), in one place.

Device helpers (``@triton.jit``):

* :func:`grouped_tile`: tile ``t`` of a ``tiles_m x tiles_n`` grid in grouped order (``GROUP_M`` row tiles sweep the
  columns together, so their A rows and B columns stay in L2);
* :func:`chunk_first_tile`: where a program starts in one row chunk of a persistent loop over ``world`` chunks
  (the chunks rotate around the ranks, grouped order inside each chunk);
* :func:`tile_dot`: the K-loop of one output tile, fp32 accumulation, operands either TMA tensor descriptors
  (``USE_TMA``) or plain pointers with any strides; :func:`tile_dot_span`: the same over a range of K tiles;
* :func:`chunk_tiles`: a program's tiles of one row chunk in a flattened persistent loop (the dense core), each
  stored by :func:`store_c` (a TMA store, or :func:`store_tile`: the masked epilogue store);
* :func:`split_k_finish`: the end of a split-K tile (partial, counter, the last split reduces in split order) with
  its cached scratch (:func:`split_k_scratch`);
* :func:`announce_done`: the last program of a kernel tells every rank that its buffers may be overwritten;
* :func:`fence_async_proxy`: orders an acquire (generic proxy) before later TMA loads (async proxy) on GPUs;

A persistent kernel loops over chunks and, inside a chunk, over its tiles (``chunk_tiles``; ``gemm_ar`` and the
split-K cores use plain ``for t in range(tl.program_id(0), num_tiles, tl.num_programs(0))`` loops) and calls these.

Host helpers: :class:`GemmConfig` (block sizes, stages, warps; frozen and validated), :func:`default_config` (by the
output's shape: :func:`wave_efficiency`), :func:`operands` (descriptors when the layouts allow TMA, pointers
otherwise), :func:`store_operand` (the output's descriptor), input checks, and
:class:`OverlapContext`, the base of the ops' contexts (symmetric buffers, epoch counter, side stream).

TMA works in both worlds with Triton 3.6 (host-side ``TensorDescriptor``; Triton's interpreter emulates it), so the
CPU tests run the descriptor path as well as the pointer path (taken when an operand's layout does not allow TMA:
no unit stride, or strides/base not 16-byte aligned).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

import triton_dist
import triton_dist.language as dl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def grouped_tile(t, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile ``t`` in grouped order: groups of ``GROUP_M`` row tiles, column-major inside a group.

    Example with tiles_m=3, tiles_n=2, GROUP_M=2: t = 0..5 -> (0,0) (1,0) (0,1) (1,1) (2,0) (2,1)."""
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % size_m
    pid_n = (t % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def chunk_first_tile(i, per_chunk):
    """The first tile of chunk ``i`` (``per_chunk`` tiles) that this program runs in a persistent loop over row
    chunks: tile ``t`` of chunk ``i`` is the loop's tile ``i * per_chunk + t``, run by program ``(that) %
    num_programs``, so this program's tiles of the chunk are ``first, first + num_programs, ...``. The callers visit
    the chunks in the order ``first, first+1, ... (mod world)`` of their op and the tiles of a chunk in grouped
    order (:func:`grouped_tile`)."""
    nprog = tl.num_programs(0)
    return ((tl.program_id(0) - i * per_chunk) % nprog + nprog) % nprog


@triton.jit
def tile_dot(a, b, off_m, off_n, rows_end, N, K, stride_am, stride_ak, stride_bk, stride_bn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``A[off_m:off_m+BM, :] @ B[:, off_n:off_n+BN]`` of one output tile.

    ``USE_TMA``: ``a`` is a descriptor of A (block ``[BM, BK]``) and ``b`` one of B (block ``[BK, BN]``), or, with
    ``B_TRANS``, of B's transpose (N x K, block ``[BN, BK]``; e.g. ``w`` for ``b = w.t()``); out-of-range rows and
    columns read as zeros. Otherwise ``a`` and ``b`` are pointers with the given strides; rows of A at or past
    ``rows_end`` and columns of B at or past ``N`` read as zeros (descriptor loads may read rows up to the end of
    A's descriptor: results of rows past ``rows_end`` must be masked at the store)."""
    return tile_dot_span(a, b, off_m, off_n, rows_end, N, K, 0, tl.cdiv(K, BLOCK_K), stride_am, stride_ak,
                         stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, B_TRANS, DOT_PRECISION)


@triton.jit
def tile_dot_span(a, b, off_m, off_n, rows_end, N, K, kt_lo, kt_hi, stride_am, stride_ak, stride_bk, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """:func:`tile_dot` over the K tiles ``kt_lo <= kt < kt_hi`` only (of ``BLOCK_K`` each): one split of a split-K
    product. Same operands and masking."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for kt in range(kt_lo, kt_hi):
            k = kt * BLOCK_K
            x = a.load([off_m, k])
            if B_TRANS:
                y = b.load([off_n, k]).T
            else:
                y = b.load([k, off_n])
            acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
    else:
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k0 = kt_lo * BLOCK_K
        a_ptrs = a + rm.to(tl.int64)[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak
        b_ptrs = b + (k0 + rk)[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
        for kt in range(kt_lo, kt_hi):
            k_left = K - kt * BLOCK_K
            x = tl.load(a_ptrs, mask=(rm[:, None] < rows_end) & (rk[None, :] < k_left), other=0.0)
            y = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def store_tile(ptr, acc, off_m, off_n, rows_end, cols_end, stride_m, stride_n,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``acc`` (cast to ``ptr``'s element type) at rows ``off_m + i`` < ``rows_end`` and columns
    ``off_n + j`` < ``cols_end`` of the matrix at ``ptr``."""
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    ptrs = ptr + rm.to(tl.int64)[:, None] * stride_m + rn[None, :] * stride_n
    mask = (rm[:, None] < rows_end) & (rn[None, :] < cols_end)
    tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_c(c_ptr, c_desc, acc, off_m, off_n, rows_end, cols_end, stride_m, stride_n,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA_STORE: tl.constexpr):
    """The dense core's epilogue: with ``TMA_STORE`` the tile goes out through ``c_desc`` (:func:`store_operand`),
    tiles 256 or more wide in two halves (half the staging shared memory, and the second half's conversion overlaps
    the first's store); else :func:`store_tile` into ``c_ptr``."""
    if TMA_STORE and BLOCK_N < 256:
        c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))
    elif TMA_STORE:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        c_desc.store([off_m, off_n], left.to(c_ptr.dtype.element_ty))
        c_desc.store([off_m, off_n + BLOCK_N // 2], right.to(c_ptr.dtype.element_ty))
    else:
        store_tile(c_ptr, acc, off_m, off_n, rows_end, cols_end, stride_m, stride_n, BLOCK_M, BLOCK_N)


@triton.jit
def chunk_tiles(a, b, c_ptr, c_desc, i, a_row0, c_row0, m_loc, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TMA_STORE: tl.constexpr):
    """This program's tiles of chunk ``i`` (``m_loc`` rows: A's from row ``a_row0``, C's from ``c_row0``) in a
    persistent loop over chunks of ``tiles_m x tiles_n`` tiles (:func:`chunk_first_tile`), in grouped order. The
    tile loop is flattened with the K loop (``tl.range(flatten=True)``: one software pipeline across tiles), each
    tile stored by :func:`store_c`. The caller does what a chunk needs first (its wait)."""
    tiles_m = tl.cdiv(m_loc, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_chunk = tiles_m * tiles_n
    for t in tl.range(chunk_first_tile(i, per_chunk), per_chunk, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(t, tiles_m, tiles_n, GROUP_M)
        acc = tile_dot(a, b, a_row0 + pid_m * BLOCK_M, pid_n * BLOCK_N, a_row0 + m_loc, N, K, stride_am, stride_ak,
                       stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, B_TRANS, DOT_PRECISION)
        store_c(c_ptr, c_desc, acc, c_row0 + pid_m * BLOCK_M, pid_n * BLOCK_N, c_row0 + m_loc, N, stride_cm,
                stride_cn, BLOCK_M, BLOCK_N, TMA_STORE)


@triton.jit
def announce_done(done_ptr, count_ptr, e, nprog):
    """Count this program as finished with the buffers the peers write (a local counter at ``count_ptr``); the last
    of ``nprog`` programs resets the counter and sets ``done[rank] = e`` (``done_ptr``, symmetric) on every rank."""
    tl.debug_barrier()  # every thread's loads of the buffers come before the count (release)
    if dl.atomic_add(count_ptr, 1, "gpu", "acq_rel") == nprog - 1:
        dl.st(count_ptr, 0, "gpu", "relaxed")  # the next call's kernel starts after this one ends
        for peer in range(dl.num_ranks()):
            dl.notify(done_ptr + dl.rank(), peer, e, "set", "intra_node")


@triton.jit
def split_k_finish(out_ptr, acc, ws_ptr, count_ptr, tile, split, split_stride, off_m, off_n, rows_end, cols_end,
                   stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """The end of one split of a split-K tile: store the fp32 partial ``acc`` at ``ws_ptr + split * split_stride +
    tile * BM * BN``, count it on ``count_ptr[tile]`` (a barrier, then acq_rel: the partial is visible first), and if
    this is the tile's last split, sum every split's partial **in split order** (deterministic), store the tile
    (:func:`store_tile`) and reset the counter for the next call. ``SPLIT_K == 1``: just the store."""
    if SPLIT_K == 1:
        store_tile(out_ptr, acc, off_m, off_n, rows_end, cols_end, stride_m, stride_n, BLOCK_M, BLOCK_N)
    else:
        cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        part = ws_ptr + tile.to(tl.int64) * (BLOCK_M * BLOCK_N)
        tl.store(part + split.to(tl.int64) * split_stride + cell, acc)
        tl.debug_barrier()  # every thread's partial is stored before the count (release below)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):  # split order: the same bits on every call
                total += tl.load(part + s * split_stride + cell, cache_modifier=".cg")
            store_tile(out_ptr, total, off_m, off_n, rows_end, cols_end, stride_m, stride_n, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")  # for the next call (stream order)


if knobs.runtime.interpret:
    @triton.jit
    def fence_async_proxy():
        """No effect in the CPU world (the interpreter has no proxies)."""
        pass
else:
    @triton.jit
    def fence_async_proxy():
        """``fence.proxy.async.global``: after an acquire that made peers' (generic-proxy) writes visible, make them
        visible to this thread's later TMA loads (async proxy) too."""
        tl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,r", [tl.program_id(0)],
                                  dtype=tl.int32, is_pure=False, pack=1)


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of a GEMM kernel. Block sizes are powers of two >= 16."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_stages: int = 3
    num_warps: int = 8
    use_tma: bool = True  # use TMA descriptors when the operand layouts allow it

    def __post_init__(self):
        check_config(self, ("group_m", "num_stages"))


def check_config(cfg, positive: tuple = ()) -> None:
    """Validate a tile config (a GEMM core's frozen dataclass): ``block_m/n/k`` powers of two >= 16, the fields named
    in ``positive`` ints >= 1, ``num_warps`` one of 1, 2, 4, 8, 16; ValueError naming the class and field."""
    what = type(cfg).__name__
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
            raise ValueError(f"{what}: {name} must be a power of two >= 16, got {v!r}")
    for name in positive:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what}: {name} must be an int >= 1, got {v!r}")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{what}: num_warps must be one of 1, 2, 4, 8, 16, got {cfg.num_warps!r}")


# Hopper, bf16/fp16, from the dense-core variants on one H200 (scripts/gemm_variants.py, docs/perf/NOTES.md "Dense
# core"): 128 x 256 tiles, 3 stages, groups of 16 row tiles, in the flattened loop with TMA stores in two halves
# (variant v7) came within 0.7-2.5 % of cuBLAS on five model shapes in two runs; 4 stages did no better, and 4 stages
# with groups of 16 in the old per-tile loop did worse (v14: 3-5 %). 128 x 128 tiles (4 warps, 5 stages) are ~5 %
# slower per tile but won where 256-wide tiles leave a wave mostly empty (M=1024 N=29568: 1.047 against 1.109).
GPU_CONFIG_16BIT = GemmConfig(128, 256, 64, group_m=16, num_stages=3, num_warps=8)
GPU_CONFIG_16BIT_NARROW = GemmConfig(128, 128, 64, group_m=8, num_stages=5, num_warps=4)
GPU_CONFIG_FP32 = GemmConfig(128, 128, 32, group_m=8, num_stages=3, num_warps=8)
# The interpreter costs ~0.1 ms per op per program whatever the block: few, mid-sized tiles.
CPU_CONFIG = GemmConfig(32, 32, 32, group_m=2, num_stages=1, num_warps=4)
NARROW_GAIN = 1.06  # the narrow tiles must fill the waves this much better to make up for their ~5 % per tile


def wave_efficiency(m: int, n: int, cfg: GemmConfig, sms: int) -> float:
    """Useful fraction of the tile slots of a persistent ``m x n`` GEMM on ``sms`` SMs: the output area over
    (waves x sms x tile area), counting the last partial wave and the parts of edge tiles outside the matrix."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    waves = triton.cdiv(tiles, sms)
    return m * n / (waves * sms * cfg.block_m * cfg.block_n)


def default_config(dtype: torch.dtype, world=None, *, m: int | None = None, n: int | None = None,
                   sms: int | None = None) -> GemmConfig:
    """The dense core's config: :data:`CPU_CONFIG` in the CPU world, :data:`GPU_CONFIG_FP32` for fp32, else
    :data:`GPU_CONFIG_16BIT`, or :data:`GPU_CONFIG_16BIT_NARROW` when the output (``m x n``, if given) fills the
    waves of ``sms`` SMs (default: the rank's share) :data:`NARROW_GAIN` times better with it."""
    world = world or triton_dist.current_world()
    if world.interpreted:
        return CPU_CONFIG
    if dtype == torch.float32:
        return GPU_CONFIG_FP32
    if m and n:
        sms = sms or num_sms(world)
        wide = wave_efficiency(m, n, GPU_CONFIG_16BIT, sms)
        if wave_efficiency(m, n, GPU_CONFIG_16BIT_NARROW, sms) > NARROW_GAIN * wide:
            return GPU_CONFIG_16BIT_NARROW
    return GPU_CONFIG_16BIT


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where torch allows it for matmuls (its default is full fp32)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def num_sms(world) -> int:
    """SMs this rank may fill (its share of the GPU: :attr:`World.num_sms`); 4 'SMs' in the CPU world (programs there
    run one after another, so few)."""
    if world.interpreted:
        return 4
    return world.num_sms


# ---------------------------------------------------------------------------------------------- split-K scratch
_split_k_buffers: dict = {}  # (device, stream) -> (fp32 workspace, int32 counters), grown on demand


def stream_key(device: torch.device):
    """The key of a per-(device, stream) cache (the split-K scratch here, the attention workspaces)."""
    if device.type != "cuda":
        return (str(device), 0)
    return (str(device), torch.cuda.current_stream(device).cuda_stream)


def split_k_scratch(device: torch.device, ws_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 workspace (at least ``ws_numel``) and the int32 tile counters (at least ``tiles``, zero between
    calls: :func:`split_k_finish` resets them) of the split-K kernels, cached per (device, stream) so that calls on
    one stream run in order and reuse them (nothing is allocated per call once they are large enough)."""
    key = stream_key(device)
    ws, counts = _split_k_buffers.get(key, (None, None))
    if ws is None or ws.numel() < ws_numel:
        ws = torch.empty(max(ws_numel, 1), dtype=torch.float32, device=device)
    if counts is None or counts.numel() < tiles:
        counts = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    _split_k_buffers[key] = (ws, counts)
    return ws, counts


def release_split_k_buffers() -> None:
    """Drop the cached split-K workspaces and counters (e.g. before a memory-hungry phase); the next call makes new
    ones."""
    _split_k_buffers.clear()


def wave_split(tiles: int, k_tiles: int, sms: int, min_k_tiles: int = 4) -> int:
    """The power-of-two K split of a split-K kernel with ``tiles`` output tiles and ``k_tiles`` K tiles: the one whose
    ``tiles * split`` programs fill their waves of ``sms`` best (one program per SM), each split at least
    ``min_k_tiles`` K tiles; a larger split must fill at least 5 % more of the slots than a smaller one (splits add
    reduction traffic, and with many waves the last one's idle slots matter little)."""
    best, best_fill, split = 1, 0.0, 1
    while split == 1 or k_tiles // split >= min_k_tiles:
        progs = tiles * split
        fill = progs / (-(-progs // sms) * sms)
        if fill > best_fill + (0.05 if split > 1 else 0.0):
            best, best_fill = split, fill
        split *= 2
    return best


def core_sms(device: torch.device) -> int:
    """SMs a single-GPU core fills: the world's share on a shared GPU (:attr:`World.num_sms`), the device's count
    otherwise (no world needed); 4 in the CPU world (its programs run one after another)."""
    if knobs.runtime.interpret or device.type != "cuda":
        return 4
    if triton_dist.is_initialized():
        return triton_dist.current_world().num_sms
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------- operands
def _tma_ok(t: torch.Tensor, unit_dim: int) -> bool:
    """``t`` (2-D) can back a TMA descriptor with ``unit_dim`` as its contiguous dimension."""
    other = 1 - unit_dim
    return (t.stride(unit_dim) == 1 and t.data_ptr() % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0
            and (t.stride(other) * t.element_size()) % 16 == 0)


def operands(a: torch.Tensor, b: torch.Tensor, cfg: GemmConfig):
    """Kernel arguments for A (M x K) and B (K x N): ``(a_arg, b_arg, use_tma, b_trans)``.

    TMA descriptors when both layouts allow it (A row-major; B row-major, or column-major as ``w.t()`` of an
    ``nn.Linear`` weight, described through ``w``), else the tensors themselves (pointer loads, any strides)."""
    def desc(t, block):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block)

    if cfg.use_tma and _tma_ok(a, 1):
        if _tma_ok(b, 1):
            return desc(a, [cfg.block_m, cfg.block_k]), desc(b, [cfg.block_k, cfg.block_n]), True, False
        if _tma_ok(b, 0):
            return desc(a, [cfg.block_m, cfg.block_k]), desc(b.t(), [cfg.block_n, cfg.block_k]), True, True
    return a, b, False, False


def store_operand(out: torch.Tensor, cfg: GemmConfig, allowed: bool):
    """``(c_desc, tma_store)`` for :func:`store_c`: a TMA descriptor of ``out`` (2-D, blocks ``block_m x block_n``,
    or ``block_n / 2`` wide for tiles 256 or more wide) where ``allowed`` and its layout permits, else ``(out,
    False)`` (masked pointer stores)."""
    if allowed and cfg.use_tma and _tma_ok(out, 1):
        width = cfg.block_n // 2 if cfg.block_n >= 256 else cfg.block_n
        return TensorDescriptor(out, list(out.shape), list(out.stride()), [cfg.block_m, width]), True
    return out, False


def check_operands(what: str, a, b, device=None) -> None:
    """Types, devices, dtypes and shapes of ``a @ b``; A must be contiguous, B may have any strides. ``device``: where
    both must be (default: this rank's device; the single-GPU cores pass ``a``'s, needing no world)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if device is None:
        device, where = triton_dist.current_world().device, "this rank's device"
    else:
        where = "a's device"
    for name, t in (("a", a), ("b", b)):
        if t.dim() != 2:
            raise ValueError(f"{what}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device.type != device.type or (t.device.type == "cuda" and t.device.index != device.index):
            raise ValueError(f"{what}: {name} is on {t.device}, expected {where} {device}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}; expected bfloat16, float16 or float32")
    if a.dtype != b.dtype:
        raise TypeError(f"{what}: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if not a.is_contiguous():
        raise ValueError(f"{what}: a must be contiguous (call .contiguous() first)")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{what}: a is {tuple(a.shape)} and b is {tuple(b.shape)}; expected b.shape[0] == "
                         f"a.shape[1]")


def check_out(what: str, out, shape, dtype, device) -> torch.Tensor:
    """``out`` if given (must be a contiguous ``shape`` tensor of ``dtype`` on ``device``), else a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype
            or out.device != torch.device(device) or not out.is_contiguous()):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else \
            type(out).__name__
        raise ValueError(f"{what}: out must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got {got}")
    return out


def check_method(what: str, method: str, methods) -> None:
    if method not in ("auto",) + tuple(methods):
        raise ValueError(f"{what}: method must be 'auto' or one of {tuple(methods)}, got {method!r}")


# ---------------------------------------------------------------------------------------------- context base
class OverlapContext:
    """Base of the overlapped GEMM contexts: symmetric buffers, a device epoch counter and, on GPUs, a side stream
    with fork/join events (capturable in CUDA graphs).

    ``max_m`` bounds the rows of A of a call, ``k`` and ``n`` are fixed. Creating a context is collective (symmetric
    allocations and a barrier): every rank creates the same contexts in the same order and closes them alike.
    """

    op = "gemm"

    def __init__(self, max_m: int, k: int, n: int, dtype: torch.dtype, config: GemmConfig | None = None):
        for name, v in (("max_m", max_m), ("k", k), ("n", n)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if dtype not in DTYPES:
            raise TypeError(f"{type(self).__name__}: dtype {dtype} is not supported; expected bfloat16, float16 or "
                            "float32")
        self.world = triton_dist.current_world()
        self.max_m, self.k, self.n, self.dtype = max_m, k, n, dtype
        self.config = config or default_config(dtype, self.world, m=max_m, n=n)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=self.world.device)
        self._symmetric: list[torch.Tensor] = []
        self.side = None
        if not self.world.interpreted:
            self.side = torch.cuda.Stream(self.world.device)
            self._fork, self._join = torch.cuda.Event(), torch.cuda.Event()

    def _alloc(self, shape, dtype, zero: bool = False) -> torch.Tensor:
        t = triton_dist.zeros(shape, dtype) if zero else triton_dist.empty(shape, dtype)
        self._symmetric.append(t)
        return t

    def next_epoch(self) -> torch.Tensor:
        """Bump the epoch on the current stream (no host sync) and return the device counter."""
        self.epoch.add_(1)
        return self.epoch

    @contextlib.contextmanager
    def forked(self):
        """Fork the side stream from the current stream; on exit the current stream waits for the side stream.
        Inside, launches go to the current stream, and to the side stream within :meth:`side_stream`. Events only:
        capturable in CUDA graphs. In the CPU world launches simply run in program order."""
        if self.side is None:
            yield
            return
        main = torch.cuda.current_stream(self.world.device)
        self._fork.record(main)
        self.side.wait_event(self._fork)
        try:
            yield
        finally:
            self._join.record(self.side)
            main.wait_event(self._join)

    def side_stream(self):
        """Context manager: launches inside go to the side stream (inside :meth:`forked` only)."""
        return contextlib.nullcontext() if self.side is None else torch.cuda.stream(self.side)

    def check_call(self, a: torch.Tensor, b: torch.Tensor, m: int, k: int, n: int) -> None:
        """Shapes and dtype of a call against this context."""
        if a.dtype != self.dtype:
            raise TypeError(f"{self.op}: context is for {self.dtype}, got {a.dtype}")
        if k != self.k or n != self.n:
            raise ValueError(f"{self.op}: context is for K={self.k}, N={self.n}; got K={k}, N={n}")
        if m > self.max_m:
            raise ValueError(f"{self.op}: context is for up to M={self.max_m} rows, got M={m}; make a larger "
                             "context")

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank closes the same contexts in the same order)."""
        self.world.barrier(f"closing a context of {self.op}")
        for t in reversed(self._symmetric):
            triton_dist.free(t)
        self._symmetric.clear()
