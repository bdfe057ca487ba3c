"""Mixture-of-experts routing: from ``topk_ids [T, k]`` to the expert-sorted row order a grouped GEMM reads, and back.

Every (token, slot) pair of ``topk_ids`` (token ``t`` sends a copy of its row to expert ``topk_ids[t, j]``) becomes one
row of the *sorted* order: rows grouped by expert, experts in order 0..E-1, and inside an expert in (token, slot)
order (a stable sort). :func:`build_routing` returns a :class:`Routing` holding, on ``topk_ids``' device:

==========================  =============  ==========================================================================
field                       shape, dtype   meaning
==========================  =============  ==========================================================================
``counts``                  [E] int32      rows of each expert
``expert_offsets``          [E+1] int32    exclusive prefix sums of ``counts``: expert ``e``'s rows are
                                           ``expert_offsets[e]:expert_offsets[e+1]`` (``grouped_gemm``'s argument)
``sorted_slots``            [T*k] int32    flat ``t * k + j`` of each sorted row
``gather_index``            [T*k] int32    token of each sorted row (``sorted_slots // k``)
``scatter_index``           [T, k] int32   sorted row of each (token, slot): ``sorted_slots[scatter_index[t, j]]
                                           == t * k + j``
==========================  =============  ==========================================================================

With ``block`` (vLLM's ``moe_align_block_size``), each expert's rows are padded to a multiple of ``block`` (empty
experts get none) in a buffer of ``padded_rows`` rows, a bound that needs no data (``T*k + min(E, T*k) * (block-1)``,
rounded up to a multiple of ``block``):

==========================  ===================  ====================================================================
``padded_offsets``          [E+1] int32          expert ``e``'s padded rows are ``padded_offsets[e]:[e+1]``; rows
                                                 from ``padded_offsets[E]`` to ``padded_rows`` belong to no expert
``padded_gather_index``     [padded_rows] int32  token of each padded row, ``-1`` for pad rows (vLLM's
                                                 ``sorted_token_ids`` holds ``t * k + j`` with sentinel ``T*k``)
``padded_scatter_index``    [T, k] int32         padded row of each (token, slot)
``block_expert``            [padded_rows/block]  expert of each block of rows, ``-1`` past ``padded_offsets[E]``
                            int32                (vLLM's ``expert_ids``)
==========================  ===================  ====================================================================

Everything is built on the device with torch ops (a stable ``torch.sort``, ``searchsorted`` for the offsets, scatters
for the inverse permutations): no host sync, so it can be captured in a CUDA graph. ``torch.bincount`` is not used
(it syncs on CUDA). Expert ids are checked against ``[0, E)`` on the host only where that costs no sync (CPU tensors)
or when asked (``check_ids=True``, or ``TRITON_DIST_DEBUG=1`` in an initialised world); an id out of range on a GPU
otherwise gives undefined routing.

Data movement (small Triton kernels, fp32 accumulation where there is arithmetic):

* :func:`gather_rows` ``(x [T, H], routing) -> [T*k, H]`` (or ``[padded_rows, H]`` with zeros in the pad rows);
* :func:`scatter_combine` ``(y [T*k or padded_rows, H], routing, topk_weights [T, k]) -> [T, H]``: ``out[t] =
  sum_j topk_weights[t, j] * y[scatter_index[t, j]]``, summed in slot order in fp32 (deterministic).

Each has a pure-torch (or pure-Python) reference: :func:`routing_reference`, :func:`gather_rows_reference`,
:func:`scatter_combine_reference`. ``triton_dist.moe`` builds dispatch/combine on these: routing lives here only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

import triton_dist
from .gemm import check_out

ID_DTYPES = (torch.int32, torch.int64)
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_ROWS = 2**31 - 1


# ---------------------------------------------------------------------------------------------- the routing
@dataclass(frozen=True)
class Routing:
    """The expert-sorted order of ``T x k`` routed rows (see the module docstring for every field)."""

    num_tokens: int
    topk: int
    num_experts: int
    counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    block: int | None = None
    padded_offsets: torch.Tensor | None = None
    padded_gather_index: torch.Tensor | None = None
    padded_scatter_index: torch.Tensor | None = None
    block_expert: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        """Rows of the sorted order, ``T * k``."""
        return self.num_tokens * self.topk

    @property
    def padded_rows(self) -> int | None:
        """Rows of the padded buffer (a bound, no data needed); None without ``block``."""
        return None if self.padded_gather_index is None else self.padded_gather_index.numel()

    @property
    def device(self) -> torch.device:
        return self.expert_offsets.device


def _padded_rows(rows: int, num_experts: int, block: int) -> int:
    return triton.cdiv(rows + min(num_experts, rows) * (block - 1), block) * block


def _check_ids_by_default(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":
        return True
    return triton_dist.is_initialized() and triton_dist.current_world().config.debug


def _check_topk_ids(what: str, topk_ids, num_experts, block, check_ids) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"{what}: topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"{what}: topk_ids must be 2-D [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{what}: topk_ids has dtype {topk_ids.dtype}; expected int32 or int64")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"{what}: topk_ids has k = 0 slots per token; expected k >= 1")
    if topk_ids.numel() > _MAX_ROWS:
        raise ValueError(f"{what}: {topk_ids.numel()} routed rows; at most {_MAX_ROWS} (int32 indices)")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"{what}: num_experts must be a positive int, got {num_experts!r}")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ValueError(f"{what}: block must be None or a positive int, got {block!r}")
    if (_check_ids_by_default(topk_ids) if check_ids is None else check_ids) and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())  # a host sync on GPUs: only where asked for
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            where = tuple(int(i) for i in (topk_ids == bad).nonzero()[0])
            raise ValueError(f"{what}: topk_ids[{where[0]}, {where[1]}] = {bad} is not an expert; expected ids in "
                             f"[0, {num_experts})")


def build_routing(topk_ids: torch.Tensor, num_experts: int, *, block: int | None = None,
                  check_ids: bool | None = None) -> Routing:
    """The :class:`Routing` of ``topk_ids`` ([T, k], int32 or int64, experts ``0..num_experts-1``).

    ``block``: also pad each expert's rows to a multiple of ``block`` (the ``padded_*`` fields and ``block_expert``).
    ``check_ids``: check every id against ``[0, num_experts)`` (a host sync on GPUs); default: on CPU tensors, and on
    GPUs under ``TRITON_DIST_DEBUG=1``. Device-side only otherwise (no host sync: CUDA-graph capturable)."""
    what = "build_routing"
    _check_topk_ids(what, topk_ids, num_experts, block, check_ids)
    dev = topk_ids.device
    t, k = topk_ids.shape
    rows = t * k
    i32 = dict(dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1).to(torch.int32)
    sorted_ids, order = torch.sort(ids, stable=True)
    expert_offsets = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, **i32), out_int32=True)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    sorted_slots = order.to(torch.int32)
    gather_index = torch.div(sorted_slots, k, rounding_mode="floor")
    arange = torch.arange(rows, **i32)
    scatter_index = torch.empty(rows, **i32).scatter_(0, order, arange).view(t, k)
    if block is None:
        return Routing(t, k, num_experts, counts, expert_offsets, sorted_slots, gather_index, scatter_index)

    padded_counts = torch.div(counts + (block - 1), block, rounding_mode="floor") * block
    padded_offsets = torch.cat([torch.zeros(1, **i32), torch.cumsum(padded_counts, 0, dtype=torch.int32)])
    sorted_long = sorted_ids.long()
    pos = arange - expert_offsets[sorted_long] + padded_offsets[sorted_long]  # padded row of each sorted row
    p_rows = _padded_rows(rows, num_experts, block)
    padded_gather_index = torch.full((p_rows,), -1, **i32).scatter_(0, pos.long(), gather_index)
    padded_scatter_index = pos[scatter_index.long()]
    starts = torch.arange(0, p_rows, block, **i32)
    block_expert = torch.searchsorted(padded_offsets, starts, right=True, out_int32=True) - 1
    block_expert = torch.where(starts < padded_offsets[num_experts], block_expert, -1)
    return Routing(t, k, num_experts, counts, expert_offsets, sorted_slots, gather_index, scatter_index, block,
                   padded_offsets, padded_gather_index, padded_scatter_index, block_expert)


def routing_reference(topk_ids: torch.Tensor, num_experts: int, *, block: int | None = None) -> Routing:
    """:func:`build_routing` in plain Python (a stable ``sorted`` of the (token, slot) pairs), on the CPU."""
    ids = topk_ids.cpu().tolist()
    t, k = topk_ids.shape
    slots = [(ids[i][j], i * k + j) for i in range(t) for j in range(k)]
    order = [s for _, s in sorted(slots, key=lambda p: p[0])]  # Python's sort is stable
    counts = [0] * num_experts
    for e, _ in slots:
        counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    scatter = [0] * (t * k)
    for row, s in enumerate(order):
        scatter[s] = row

    def i32(values, shape=None):
        out = torch.tensor(values, dtype=torch.int32)
        return out.view(shape) if shape is not None else out

    base = (t, k, num_experts, i32(counts), i32(offsets), i32(order), i32([s // k for s in order]),
            i32(scatter, (t, k)))
    if block is None:
        return Routing(*base)
    p_offsets = [0]
    for c in counts:
        p_offsets.append(p_offsets[-1] + -(-c // block) * block)
    p_rows = _padded_rows(t * k, num_experts, block)
    p_gather, p_scatter = [-1] * p_rows, [0] * (t * k)
    for e in range(num_experts):
        for i, row in enumerate(range(offsets[e], offsets[e + 1])):
            p_gather[p_offsets[e] + i] = order[row] // k
            p_scatter[order[row]] = p_offsets[e] + i
    blocks = []
    for b in range(p_rows // block):
        start = b * block
        blocks.append(next((e for e in range(num_experts) if p_offsets[e] <= start < p_offsets[e + 1]), -1))
    return Routing(*base, block, i32(p_offsets), i32(p_gather), i32(p_scatter, (t, k)), i32(blocks))


def rank_counts(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """Expert parallelism: the (token, slot) pairs of ``topk_ids`` ([T, k], ids in ``[-1, num_experts)``; -1: no
    expert) that go to each rank, [world_size] int32, when rank ``r`` owns experts ``r * E/W .. (r + 1) * E/W - 1``.
    On the device, no host sync (a scatter-add; ``torch.bincount`` would sync)."""
    if num_experts % world_size:
        raise ValueError(f"rank_counts: num_experts = {num_experts} must be a multiple of world_size = {world_size}")
    ids = topk_ids.reshape(-1).to(torch.int64)
    valid = ids >= 0
    ranks = torch.where(valid, torch.div(ids, num_experts // world_size, rounding_mode="floor"), 0)
    out = torch.zeros(world_size, dtype=torch.int32, device=topk_ids.device)
    return out.scatter_add_(0, ranks, valid.to(torch.int32))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, rows, H, stride_x, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[r, :] = x[idx[r], :]`` for ``BLOCK_R`` rows and ``BLOCK_H`` columns; zeros where ``idx[r] < 0``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(idx_ptr + r, mask=r < rows, other=-1)
    cols = c[None, :] < H
    v = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + c[None, :], mask=(src >= 0)[:, None] & cols,
                other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_o + c[None, :], v, mask=(r < rows)[:, None] & cols)


@triton.jit
def _scatter_combine_kernel(y_ptr, idx_ptr, w_ptr, out_ptr, T, H, stride_y, stride_o, stride_wt, stride_wk,
                            TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    """``out[t, :] = sum_j w[t, j] * y[idx[t, j], :]`` in fp32, slots in order ``j = 0..TOPK-1``."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok = t < T
    mask = tok[:, None] & (c[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(idx_ptr + t.to(tl.int64) * TOPK + j, mask=tok, other=0)
        v = tl.load(y_ptr + row.to(tl.int64)[:, None] * stride_y + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            wgt = tl.load(w_ptr + t.to(tl.int64) * stride_wt + j * stride_wk, mask=tok, other=0.0).to(tl.float32)
            v = v * wgt[:, None]
        acc += v
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_o + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(h: int, rows_per_block: int):
    """(BLOCK_R, BLOCK_H): the interpreter pays per op per program, so there one program covers many elements."""
    if knobs.runtime.interpret:
        return 32, min(4096, triton.next_power_of_2(max(h, 16)))
    return rows_per_block, min(1024, triton.next_power_of_2(max(h, 16)))


# ---------------------------------------------------------------------------------------------- host side
def _check_routing(what: str, routing, padded: bool) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"{what}: routing must be a Routing (from build_routing), got {type(routing).__name__}")
    if padded and routing.block is None:
        raise ValueError(f"{what}: padded=True needs a routing built with block=...")


def _check_rows(what: str, name: str, t, rows: int | None, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{what}: {name} must be 2-D [rows, hidden], got shape {tuple(t.shape)}")
    if t.dtype not in ROW_DTYPES:
        raise TypeError(f"{what}: {name} has dtype {t.dtype}; expected bfloat16, float16 or float32")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{what}: {name} has {t.shape[0]} rows, expected {rows}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device}, the routing on {device}")
    if t.shape[1] and t.stride(1) != 1:
        raise ValueError(f"{what}: {name} must have unit stride along hidden (call .contiguous() first)")


def gather_rows(x: torch.Tensor, routing: Routing, *, padded: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ``x`` ([T, H]) in the routing's sorted order: ``out[r] = x[gather_index[r]]`` ([T*k, H]); with
    ``padded``, the padded order ([padded_rows, H], pad rows zero). Exact copies; bf16, fp16 or fp32."""
    what = "gather_rows"
    _check_routing(what, routing, padded)
    _check_rows(what, "x", x, routing.num_tokens, routing.device)
    idx = routing.padded_gather_index if padded else routing.gather_index
    rows, h = idx.numel(), x.shape[1]
    out = check_out(what, out, (rows, h), x.dtype, x.device)
    if rows and h:
        block_r, block_h = _blocks(h, 8)
        _gather_rows_kernel[(triton.cdiv(rows, block_r), triton.cdiv(h, block_h))](
            x, idx, out, rows, h, x.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
    return out


def gather_rows_reference(x: torch.Tensor, routing: Routing, *, padded: bool = False) -> torch.Tensor:
    """:func:`gather_rows` by torch indexing."""
    idx = (routing.padded_gather_index if padded else routing.gather_index).long().to(x.device)
    out = x[idx.clamp(min=0)]
    out[idx < 0] = 0
    return out


def scatter_combine(y: torch.Tensor, routing: Routing, topk_weights: torch.Tensor | None, *, padded: bool = False,
                    out: torch.Tensor | None = None, tokens: tuple[int, int] | None = None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The top-k weighted sum of the expert outputs back to tokens: ``out[t] = sum_j topk_weights[t, j] *
    y[scatter_index[t, j]]`` ([T, H] in ``out_dtype``, default ``y``'s), accumulated in fp32 in slot order
    (deterministic).

    ``y``: [T*k, H] in sorted order, or [padded_rows, H] with ``padded`` (pad rows are never read).
    ``topk_weights``: [T, k], any float dtype; None sums the slots unweighted. ``tokens``: ``(start, stop)``, only
    those tokens (``out`` [stop - start, H]: e.g. one source rank's tokens of a plan)."""
    what = "scatter_combine"
    _check_routing(what, routing, padded)
    idx = routing.padded_scatter_index if padded else routing.scatter_index
    _check_rows(what, "y", y, routing.padded_rows if padded else routing.num_rows, routing.device)
    t, k = routing.num_tokens, routing.topk
    start, stop = (0, t) if tokens is None else tokens
    if not 0 <= start <= stop <= t:
        raise ValueError(f"{what}: tokens must be (start, stop) with 0 <= start <= stop <= {t}, got {tokens}")
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor):
            raise TypeError(f"{what}: topk_weights must be a torch.Tensor or None, got {type(topk_weights).__name__}")
        if tuple(topk_weights.shape) != (t, k) or not topk_weights.dtype.is_floating_point:
            raise ValueError(f"{what}: topk_weights must be a float [{t}, {k}] tensor, got "
                             f"{tuple(topk_weights.shape)} {topk_weights.dtype}")
        if topk_weights.device != y.device:
            raise ValueError(f"{what}: topk_weights is on {topk_weights.device}, y on {y.device}")
    if out_dtype is not None and out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{what}: out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    h = y.shape[1]
    out = check_out(what, out, (stop - start, h), out_dtype or y.dtype, y.device)
    if stop > start and h:
        block_t, block_h = _blocks(h, 4)
        w = topk_weights[start:stop] if topk_weights is not None else y
        _scatter_combine_kernel[(triton.cdiv(stop - start, block_t), triton.cdiv(h, block_h))](
            y, idx[start:stop].contiguous(), w, out, stop - start, h, y.stride(0), out.stride(0),
            w.stride(0) if topk_weights is not None else 0, w.stride(1) if topk_weights is not None else 0,
            TOPK=k, WEIGHTED=topk_weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return out


def scatter_combine_reference(y: torch.Tensor, routing: Routing, topk_weights: torch.Tensor | None, *,
                              padded: bool = False) -> torch.Tensor:
    """:func:`scatter_combine` in torch: fp32, slots added in order."""
    idx = (routing.padded_scatter_index if padded else routing.scatter_index).long().to(y.device)
    acc = torch.zeros((routing.num_tokens, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(routing.topk):
        v = y[idx[:, j]].float()
        if topk_weights is not None:
            v = v * topk_weights[:, j, None].float()
        acc += v
    return acc.to(y.dtype)
