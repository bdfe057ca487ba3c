"""Tensor-parallel MoE: every rank holds a ``1 / world`` slice of every expert's intermediate dimension.

Shapes (``W`` ranks, ``E`` experts, top-``k``; sequence-parallel activations as in :mod:`~triton_dist.kernels.ag_gemm`):

* :func:`ag_moe` ``(x [T_loc, H], w1 [E, H, N], topk_ids [T_loc, k], topk_weights [T_loc, k]) -> (h, plan)``: every
  rank's tokens all-gathered (``T = W * T_loc``, rank ``s``'s tokens at rows ``s * T_loc ..``) and each (token,
  slot) pair's row multiplied by its expert's ``w1`` slice: ``h`` [T * k, N], the pairs in the *plan's* order
  (grouped by source rank, then expert, then token, then slot). ``N`` is this rank's slice of the up / gate
  projection (e.g. ``2 * I / W`` for a fused gate-up weight).
* :func:`moe_rs` ``(h [T * k, I_loc], w2 [E, I_loc, H], plan) -> [T_loc, H]``: each pair's row times its expert's
  ``w2`` slice, the top-k weighted sum per token (this rank's part of the sum over the intermediate dimension), then
  the reduce-scatter over ranks: this rank's tokens of the full result.
* :func:`moe_ar`: the same ending in an all-reduce (decode: the tokens replicated on every rank, a plan from
  :func:`moe_plan`; ``[T, H]`` on every rank).

The overlap in :func:`ag_moe`: the rows of rank ``s`` arrive in the gathered buffer of an ``ag_gemm`` context (copy
engine or SM pull on a side stream, :func:`~triton_dist.kernels.ag_gemm.gather_chunks`) while the grouped GEMM
runs on the main stream. The plan orders the pairs by source rank first, so every row tile of the GEMM reads one
rank's tokens, and it waits only for that rank's chunk flag before it gathers its rows (pointer loads through the
plan's token index: rows of many tokens per tile). The routing (the top-k ids and weights, all-gathered first: a
few KB) is on the device, no host sync.

The GEMM (:func:`moe_gemm`): a group per (source rank, expert), ``G = W * E`` groups in the plan's offsets, weight
``g % E``; row tiles never straddle groups; fp32 accumulation.

The overlap in :func:`moe_rs`: the plan's rows of one source rank's tokens are a contiguous run of groups, so the
down projection is computed one owner at a time (``dst = rank+1, ..., rank``): the grouped GEMM of the pairs of
``dst``'s tokens, their top-k weighted sum in fp32 into a local partial, then a DMA of that partial into ``dst``'s
receive buffer on a copy stream while the next owner's chunk computes (``gemm_rs``'s ``decomposed`` pipeline,
:func:`~triton_dist.kernels.gemm_rs.decomposed_reduce_scatter`); each rank sums its tokens' ``W`` partials in rank
order (fp32, one rounding). :func:`moe_ar` (decode sizes) runs the GEMM, the weighted sum and the one-shot
all-reduce in sequence.

References: :func:`ag_moe_reference`, :func:`moe_rs_reference`, :func:`moe_ar_reference` (torch, fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton import knobs

import triton_dist
import triton_dist.language as dl
from triton_dist.kernels import ag_gemm as _agg
from triton_dist.kernels import gemm_rs as _grs
from triton_dist.kernels import all_gather as _ag
from triton_dist.kernels import all_reduce as _ar
from triton_dist.kernels._common import call_signature
from triton_dist.kernels.gemm import check_method, dot_precision, grouped_tile, store_tile
from triton_dist.kernels.grouped_gemm import expert_of_tile, expert_row_tiles, max_row_tiles
from triton_dist.kernels.routing import Routing, build_routing, scatter_combine

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("copy_engine", "sm")


@dataclass
class MoEPlan:
    """The routing of one MoE call over ``num_tokens`` tokens (all ranks' for :func:`ag_moe`): ``routing`` over ``G =
    sources * num_experts`` groups (group ``s * E + e``: source rank ``s``'s pairs for expert ``e``; ``sources`` is 1
    for :func:`moe_plan`), the top-k weights of those tokens ([num_tokens, k] fp32), and the tokens per source rank."""

    routing: Routing
    weights: torch.Tensor
    num_experts: int
    sources: int
    tokens_per_source: int

    @property
    def num_rows(self) -> int:
        return self.routing.num_rows


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _moe_gemm_kernel(x, gidx, w, out, offs_ptr, sig_ptr, epoch_ptr, R, N, K, G, E_W,
                     stride_xm, stride_we, stride_wk, stride_wn, stride_om, row_tile_bound, sig_base, x_par, sig_par,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     G_BLOCK: tl.constexpr, GATHER: tl.constexpr, WAIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Persistent over the tiles of ``G`` groups (offsets at ``offs_ptr``) times column tiles: tile rows ``r`` of
    group ``g`` are ``x[gidx[r]]`` (``GATHER``; else ``x[r]``) times ``w[g % E_W]``, stored at ``out[r]``. ``WAIT``:
    before reading a tile's rows wait ``sig_ptr[sig_base + p * sig_par + g // E_W] >= e`` (``e`` at ``epoch_ptr``,
    ``p = e % 2``; ag_moe: ag_gemm's chunk flags at ``world + src``), and read ``x`` from ``x + p * x_par``
    (double-buffered sources; ``x_par = sig_par = 0``: one buffer)."""
    lo, hi, first, end = expert_row_tiles(offs_ptr, G, R, G_BLOCK, BLOCK_M)
    tiles_m = tl.minimum(tl.max(end, 0), row_tile_bound)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if WAIT:
        e_call = tl.load(epoch_ptr)
        par = e_call % 2
        x += (par * x_par).to(tl.int64)
        sig_ptr += sig_base + par * sig_par
    for t in range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        gm, pid_n = grouped_tile(t, tiles_m, tiles_n, GROUP_M)
        g, off_m, rows_end = expert_of_tile(gm, lo, hi, first, end, G_BLOCK, BLOCK_M)
        we = g % E_W
        rows = off_m + tl.arange(0, BLOCK_M)
        rmask = rows < rows_end
        if GATHER:
            src_rows = tl.load(gidx + rows, mask=rmask, other=0)
        else:
            src_rows = rows
        xp = x
        if WAIT:
            token = dl.wait(sig_ptr + g // E_W, 1, "sys", "acquire", e_call, cmp="ge")
            xp = dl.consume_token(x, token)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        a_rows = xp + src_rows.to(tl.int64)[:, None] * stride_xm
        b_base = w + we.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(a_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_base + kk[:, None] * stride_wk, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        store_tile(out, acc, off_m, pid_n * BLOCK_N, rows_end, N, stride_om, 1, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------- host side
def _config(dtype: torch.dtype, rows_per_group: int, n: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): small tiles in the CPU world; on GPUs (pointer loads: the gathered
    rows rule out TMA for A) 128 x 256 tiles on 8 warps for groups of 128 rows or more, 64 x 256 on 4 warps below
    (row tiles never straddle groups), 128 columns where N <= 128. Measured on one H200 at Qwen3-30B-A3B's shape
    (``docs/perf/NOTES.md``, "Mixture of experts", seventh session): these are the fastest of the configs timed at
    4-256 rows per group, 1.8x / 1.6x the former fixed 64 x 128 x 64 at 256 rows per group."""
    if knobs.runtime.interpret:
        return 16, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    bn = 128 if n <= 128 else 256
    if rows_per_group >= 128:
        return 128, bn, 64, 8, 3
    return 64, bn, 64, 4, 3


def _sms(device: torch.device) -> int:
    """Programs of a launch that owns the GPU: this rank's share of the SMs in a world (shared-GPU worlds split
    them), the device's SMs without one, 4 in the CPU world."""
    if knobs.runtime.interpret:
        return 4
    if triton_dist.is_initialized():
        return triton_dist.current_world().num_sms
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class GemmWait:
    """Per-tile waits of :func:`launch_moe_gemm`: ``sig`` (int32 flags) at ``sig_base + p * sig_par + group //
    E_W`` >= the epoch at ``epoch`` (``p``: its parity; ``x`` read at ``x + p * x_par``), the grid at most
    ``budget`` programs (the SMs left to the comm kernels' side stream)."""

    sig: torch.Tensor
    epoch: torch.Tensor
    budget: int | None
    sig_base: int
    x_par: int = 0
    sig_par: int = 0


def launch_moe_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, gidx, groups: int,
                    rows: int, gather: bool, wait: GemmWait | None, group_rows: int | None = None) -> None:
    """The grouped GEMM kernel on ``groups`` groups of rows (``offsets`` [groups + 1] on the device, ``rows`` an
    upper bound of its last entry), group ``g`` with ``w[g % w.shape[0]]`` (:func:`moe_gemm`; ``a2a_gemm``).
    ``group_rows``: the host's estimate of the rows in these groups (default ``rows``), for the tile shape."""
    k, n = w.shape[1], w.shape[2]
    bm, bn, bk, warps, stages = _config(x.dtype, (rows if group_rows is None else group_rows) // max(groups, 1), n)
    bound = max_row_tiles(rows, groups, bm)
    tiles = bound * triton.cdiv(n, bn)
    budget = wait.budget if wait is not None else None
    programs = min(tiles, budget or _sms(x.device))
    _moe_gemm_kernel[(max(1, programs),)](
        x, gidx if gidx is not None else offsets, w, out, offsets, wait.sig if wait else out,
        wait.epoch if wait else out, rows, n, k, groups, w.shape[0], x.stride(0), w.stride(0), w.stride(1),
        w.stride(2), out.stride(0), bound, wait.sig_base if wait else 0, wait.x_par if wait else 0,
        wait.sig_par if wait else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, G_BLOCK=triton.next_power_of_2(groups), GATHER=gather,
        WAIT=wait is not None, DOT_PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=stages)


def moe_gemm_checks(what: str, x, w, plan: MoEPlan, gather: bool) -> None:
    """:func:`moe_gemm`'s argument checks (``what``: the calling op's name, for the errors)."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dtype not in DTYPES:
            raise TypeError(f"{what}: {name} must be a bf16, fp16 or fp32 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or w.dtype != x.dtype:
        raise ValueError(f"{what}: expected x [rows, K] and w [E, K, N] of one dtype, got {tuple(x.shape)} "
                         f"{x.dtype} and {tuple(w.shape)} {w.dtype}")
    if w.shape[0] != plan.num_experts:
        raise ValueError(f"{what}: w has {w.shape[0]} experts, the plan {plan.num_experts}")
    if x.stride(1) != 1:
        raise ValueError(f"{what}: x must have a unit stride along K, got strides {x.stride()}")
    rows = plan.routing.num_rows
    if not gather and x.shape[0] != rows:
        raise ValueError(f"{what}: with gather=False x must hold the plan's {rows} rows, got {x.shape[0]}")


def moe_gemm(x: torch.Tensor, w: torch.Tensor, plan: MoEPlan, *, gather: bool = True, out_dtype=None,
             _wait: GemmWait | None = None) -> torch.Tensor:
    """The grouped GEMM of a plan: row ``r`` of the result is ``x[token of r] @ w[expert of r]`` (``gather``; else
    ``x[r] @ w[expert of r]``, ``x`` already in the plan's row order). ``x`` [*, K] with a unit stride along K; ``w``
    [E, K, N] (any strides); result [plan rows, N] in ``out_dtype`` (default ``x``'s), fp32 accumulation."""
    moe_gemm_checks("moe_gemm", x, w, plan, gather)
    rows, n = plan.routing.num_rows, w.shape[2]
    out = torch.empty((rows, n), dtype=out_dtype or x.dtype, device=x.device)
    if rows and n:
        r = plan.routing
        launch_moe_gemm(x, w, out, r.expert_offsets, r.gather_index, r.num_experts, rows, gather, _wait)
    return out


def _check_routing_args(what, topk_ids, topk_weights, tokens, num_experts, device):
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32,
                                                                                              torch.int64):
        raise TypeError(f"{what}: topk_ids must be a [T, k] int32 or int64 tensor")
    if topk_ids.shape[0] != tokens:
        raise ValueError(f"{what}: topk_ids has {topk_ids.shape[0]} rows, x {tokens} tokens")
    if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != tuple(topk_ids.shape) or \
            not topk_weights.dtype.is_floating_point:
        raise ValueError(f"{what}: topk_weights must be a float tensor of topk_ids' shape {tuple(topk_ids.shape)}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device.type != device.type:
            raise ValueError(f"{what}: {name} is on {t.device}, expected {device}")
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{what}: topk_ids must be in [0, {num_experts}), got values in [{lo}, {hi}]")


def moe_plan(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> MoEPlan:
    """The plan of tokens every rank holds (decode with replicated tokens; one source): routing over the experts,
    weights as fp32. On the device, no host sync."""
    _check_routing_args("moe_plan", topk_ids, topk_weights, topk_ids.shape[0], num_experts, topk_ids.device)
    routing = build_routing(topk_ids, num_experts, check_ids=False)
    return MoEPlan(routing, topk_weights.to(torch.float32).contiguous(), num_experts, 1, topk_ids.shape[0])


class AgMoEContext(_agg.AGGemmContext):
    """:func:`ag_moe`'s gathered-token buffer (``max_tokens`` rows of ``hidden``), chunk flags, epoch and side
    stream: an ``ag_gemm`` context (``n`` is unused). Made once per (max tokens, hidden, dtype), reused."""

    op = "ag_moe"


def ag_moe(x: torch.Tensor, w1: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
           ctx: AgMoEContext, meta_ctx: _ag.AllGatherContext | None, method: str = "copy_engine"):
    """All-gather of the token shards overlapped with the grouped up-projection (module docstring). ``x`` [T_loc, H]
    contiguous (the same ``T_loc`` on every rank), ``w1`` [E, H, N] (this rank's slice), ``topk_ids`` /
    ``topk_weights`` [T_loc, k] (ids in ``[0, E)``). ``meta_ctx``: an fp32 all-gather context for ``T_loc * 2k``
    elements (the routing; None at world size 1). Returns ``(h [W * T_loc * k, N], plan)``. ``method``: the
    gather's (``copy_engine`` or ``sm``). Collective; no host sync."""
    what = "ag_moe"
    check_inputs(what, x, w1, topk_ids, topk_weights, method)
    world = ctx.world.world_size
    t_loc, hidden = x.shape
    e, k = w1.shape[0], topk_ids.shape[1]
    if hidden != ctx.k or x.dtype != ctx.dtype or world * t_loc > ctx.max_m:
        raise ValueError(f"{what}: the context is for up to {ctx.max_m} gathered tokens of [*, {ctx.k}] "
                         f"{ctx.dtype}, got x {tuple(x.shape)} {x.dtype} on {world} ranks")
    meta = torch.cat([topk_ids.to(torch.float32), topk_weights.to(torch.float32)], dim=1)  # ids exact below 2^24
    gathered_meta = _ag.all_gather(meta, ctx=meta_ctx) if world > 1 else meta
    ids = gathered_meta[:, :k].to(torch.int64)
    weights = gathered_meta[:, k:].contiguous()
    src = torch.div(torch.arange(world * t_loc, device=x.device), max(t_loc, 1), rounding_mode="floor")
    routing = build_routing(src[:, None] * e + ids, world * e, check_ids=False)
    plan = MoEPlan(routing, weights, e, world, t_loc)
    if world == 1:  # nothing to gather: the one chunk's flag is raised for good (ag_gemm's context)
        return moe_gemm(x, w1, plan, _wait=GemmWait(ctx.signals, ctx.epoch, None, world)), plan
    epoch = ctx.next_epoch()
    sig = call_signature(what, method, x.dtype, t_loc * hidden, hidden)
    gathered = ctx.gathered[:world * t_loc]
    with ctx.forked():
        with ctx.side_stream():
            _agg.gather_chunks(ctx, x, epoch, sig, method)
        h = moe_gemm(gathered, w1, plan, _wait=GemmWait(ctx.signals, epoch, _agg.consumer_programs(ctx, method), world))
    return h, plan


def check_inputs(what: str, x, w1, topk_ids, topk_weights, method: str) -> None:
    """:func:`ag_moe`'s argument checks (before any collective context is made for the call)."""
    check_method(what, method, METHODS)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous() or x.dtype not in DTYPES:
        raise ValueError(f"{what}: x must be a contiguous [T_loc, H] bf16, fp16 or fp32 tensor")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3 or w1.shape[1] != x.shape[1] or w1.dtype != x.dtype:
        got = f"{tuple(w1.shape)} {w1.dtype}" if isinstance(w1, torch.Tensor) else type(w1).__name__
        raise ValueError(f"{what}: w1 must be [E, H, N] (every expert's slice on this rank) of x's dtype with H = "
                         f"{x.shape[1]}, got {got}")
    _check_routing_args(what, topk_ids, topk_weights, x.shape[0], w1.shape[0], x.device)


class MoERSContext(_grs.GemmRSContext):
    """:func:`moe_rs`'s receive buffer (``world x ceil(max_tokens / world) x hidden`` fp32 partials, symmetric),
    signals, epoch, side and copy streams: a ``gemm_rs`` context with fp32 partials (``inter`` is unused). Made once
    per (max tokens, hidden, dtype) and reused; collective."""

    op = "moe_rs"

    def __init__(self, max_tokens: int, inter: int, hidden: int, dtype: torch.dtype, **kw):
        super().__init__(max_tokens, inter, hidden, dtype, partial_dtype=torch.float32, **kw)


def _check_down(what: str, h, w2, plan: MoEPlan) -> None:
    if not isinstance(plan, MoEPlan):
        raise TypeError(f"{what}: plan must be a MoEPlan (from ag_moe or moe_plan), got {type(plan).__name__}")
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[0] != plan.num_rows:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{what}: h must be [plan rows = {plan.num_rows}, I_loc] in the plan's row order, got {got}")


def _down_rows(h, w2, plan: MoEPlan, y: torch.Tensor, source: int | None) -> None:
    """``y[r] = h[r] @ w2[expert of r]`` for the pairs of ``source``'s tokens (every pair with None): the grouped
    GEMM on the plan's groups of that source (a slice of its offsets), ``y`` in ``h``'s dtype."""
    r, e = plan.routing, plan.num_experts
    groups = r.num_experts if source is None else e
    offs = r.expert_offsets if source is None else r.expert_offsets[source * e:(source + 1) * e + 1]
    if r.num_rows and w2.shape[2]:
        launch_moe_gemm(h, w2, y, offs, None, groups, r.num_rows, False, None,
                        group_rows=r.num_rows // (1 if source is None else plan.sources))


def _down_partial(h, w2, plan: MoEPlan, out_dtype) -> torch.Tensor:
    """This rank's part of every token's output: the pairs' rows times ``w2`` (in ``h``'s dtype, as torch's MoE
    rounds them), top-k weighted per token in fp32, stored in ``out_dtype``."""
    return scatter_combine(moe_gemm(h, w2, plan, gather=False), plan.routing, plan.weights, out_dtype=out_dtype)


def moe_rs(h: torch.Tensor, w2: torch.Tensor, plan: MoEPlan, *, ctx: MoERSContext | None) -> torch.Tensor:
    """Down projection of :func:`ag_moe`'s (activated) rows, the top-k weighted sum, and the reduce-scatter of the
    tokens to their ranks: ``[T_loc, H]`` in ``h``'s dtype. ``h`` [plan rows, I_loc] in the plan's row order, ``w2``
    [E, I_loc, H]; ``ctx``: a :class:`MoERSContext` for at least ``T`` tokens of ``H`` (None at world size 1).

    Pipelined by owner rank (``gemm_rs``'s ``decomposed`` pipeline): for dst = rank+1, ..., rank the grouped GEMM of
    the pairs of ``dst``'s tokens (the plan's groups of source ``dst``) and their top-k weighted sum (fp32) into a
    local partial; each partial is copied into ``dst``'s receive buffer by DMA on a copy stream while the next
    chunk computes; each rank sums the ``world`` partials of its tokens in rank order (fp32, one rounding).
    Collective; no host sync."""
    what = "moe_rs"
    _check_down(what, h, w2, plan)
    world, t_loc, hidden = plan.sources, plan.tokens_per_source, w2.shape[2]
    if ctx is None or ctx.world.world_size == 1:
        if world != 1:
            raise ValueError(f"{what}: the plan has {world} source ranks; a MoERSContext of that world is needed")
        return _down_partial(h, w2, plan, h.dtype)
    if ctx.world.world_size != world or hidden != ctx.n or t_loc > ctx.max_m_loc or h.dtype != ctx.dtype:
        raise ValueError(f"{what}: the context is for {ctx.world.world_size} ranks of up to {ctx.max_m_loc} tokens "
                         f"of [*, {ctx.n}] {ctx.dtype}; got a plan of {world} x {t_loc} tokens, w2 "
                         f"{tuple(w2.shape)}, h {h.dtype}")
    moe_gemm_checks(what, h, w2, plan, gather=False)
    epoch = ctx.next_epoch()
    sig = call_signature(what, "decomposed", h.dtype, world * t_loc * hidden, hidden)
    y = torch.empty((plan.num_rows, hidden), dtype=h.dtype, device=h.device)
    out = torch.empty((t_loc, hidden), dtype=h.dtype, device=h.device)

    def compute(dst: int, part: torch.Tensor) -> None:
        _down_rows(h, w2, plan, y, dst)
        scatter_combine(y, plan.routing, plan.weights, tokens=(dst * t_loc, (dst + 1) * t_loc), out=part,
                        out_dtype=part.dtype)

    if t_loc and hidden:
        _grs.decomposed_reduce_scatter(ctx, compute, out, t_loc, epoch, sig)
    return out


def moe_ar(h: torch.Tensor, w2: torch.Tensor, plan: MoEPlan, *, ctx: _ar.AllReduceContext | None) -> torch.Tensor:
    """:func:`moe_rs` ending in an all-reduce: every token's full output ``[T, H]`` on every rank (decode: the plan
    of :func:`moe_plan`, the tokens replicated). ``ctx``: an fp32 all-reduce context for ``T * H`` elements (None at
    world size 1). The grouped GEMM, the top-k weighted sum (fp32) and our all-reduce in sequence: at decode sizes
    (``T * H`` fp32 of a few hundred KB) the one-shot all-reduce is a few microseconds, less than splitting the
    GEMM would cost. Collective."""
    what = "moe_ar"
    _check_down(what, h, w2, plan)
    if ctx is None or ctx.world.world_size == 1:
        return _down_partial(h, w2, plan, h.dtype)
    return _ar.all_reduce(_down_partial(h, w2, plan, torch.float32), ctx=ctx).to(h.dtype)


# ---------------------------------------------------------------------------------------------- references
def _gather(t: torch.Tensor) -> torch.Tensor:
    world = triton_dist.current_world()
    parts = [torch.empty_like(t) for _ in range(world.world_size)]
    dist.all_gather(parts, t.contiguous(), group=world.group)
    return torch.cat(parts)


def ag_moe_reference(x, w1, topk_ids, topk_weights):
    """fp32 ``[T, k, N]``: every gathered token's row times the ``w1`` slice of each of its experts (pair order
    ``[token, slot]``, not the plan's)."""
    xs, ids = _gather(x).float(), _gather(topk_ids).long()
    return torch.einsum("th,tkhn->tkn", xs, w1.float()[ids])


def _down_reference(h_pairs, w2, ids, weights):
    """fp32 ``[T, H]``: sum over slots of ``weights * (h_pairs[t, j] @ w2[ids[t, j]])``."""
    y = torch.einsum("tki,tkih->tkh", h_pairs.float(), w2.float()[ids.long()])
    return (y * weights.float()[..., None]).sum(1)


def moe_rs_reference(h_pairs, w2, topk_ids, topk_weights):
    """fp32 ``[T_loc, H]``: the down projection of the pairs' rows (``h_pairs`` [T, k, I_loc] in pair order, all
    gathered tokens), weighted, summed over ranks, this rank's tokens."""
    world = triton_dist.current_world()
    full = _down_reference(h_pairs, w2, _gather(topk_ids), _gather(topk_weights))
    dist.all_reduce(full, group=world.group)
    t_loc = full.shape[0] // world.world_size
    return full[world.rank * t_loc:(world.rank + 1) * t_loc]


def moe_ar_reference(h_pairs, w2, topk_ids, topk_weights):
    """fp32 ``[T, H]``: the down projection, weighted, summed over ranks (replicated tokens)."""
    full = _down_reference(h_pairs, w2, topk_ids, topk_weights)
    dist.all_reduce(full, group=triton_dist.current_world().group)
    return full


def plan_rows_to_pairs(rows: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    """``[T, k, N]`` from rows in the plan's order (``rows[scatter_index[t, j]]``)."""
    idx = plan.routing.scatter_index.long()
    return rows[idx.reshape(-1)].view(idx.shape[0], idx.shape[1], -1)
