"""Expert-parallel MoE dispatch and combine against torch all-to-all: ``triton-dist bench moe -n N``.

::

    triton-dist bench moe -n 8 [--cases ep_ll,ep_normal,tp] [--tokens 128] [--normal-tokens 4096] [--hidden 7168]
                               [--topk 8] [--experts 256]
                               [--fp8 both|off|only] [--samples 20] [--graph-calls 20] [--out DIR]
                               [--plot PATH | --no-plot]
    triton-dist bench moe -n 4 --share-gpus                   # shared-GPU world: plumbing, rows marked shared_gpu
    triton-dist bench moe -n 2 --mode cpu -- --smoke          # CPU world: a plumbing check, no timings
    python -m triton_dist.bench.moe --render bench/results/h200.jsonl [--run-id ID]   # no GPU needed

``ep_ll`` (any world; ``--experts`` a multiple of it, all experts local at world size 1): the low-latency
expert-parallel dispatch and combine of :class:`triton_dist.moe.EPLowLatencyContext` (provider
``triton_dist:ep_ll``; with fp8 dispatch, e4m3 values and one fp32 scale per 128, ``triton_dist:ep_ll_fp8``) on
DeepSeek-V3's decode shape: per rank ``--tokens`` tokens of ``--hidden`` values, each routed to ``--topk`` distinct
random experts of ``--experts`` (a fixed seed per rank), random fp32 weights. Three ops, each its own row: op
``ep_dispatch`` (the dispatch alone), ``ep_combine`` (the combine alone, of the rows one dispatch delivered) and
``ep_round_trip`` (dispatch then combine); shape ``T=..,H=..,k=..,E=..,world=..``. There is no expert compute: the
combine's input ``y`` is the received rows (dequantised with fp8), prepared once outside the timing, so only the
communication (and the combine's weighted sum) is timed.

Baselines: ``torch_all_to_all`` (``torch_all_to_all_fp8``: the rows quantised by
:func:`~triton_dist.moe.quantize_fp8_reference` and sent as bytes, values and scales in one row) is what a user of
``torch.distributed.all_to_all_single`` writes: the pairs sorted by expert, the per-(rank, expert) counts exchanged
by one ``all_to_all_single``, a host sync to size the receive buffer and the splits (what every user of
``all_to_all_single`` pays), the rows by a second; the combine is the reverse ``all_to_all_single`` and a torch
weighted sum (:func:`~triton_dist.moe.combine_reference`: fp32, slot order). Its received rows stay source-major (the
regrouping by expert a grouped GEMM needs is not charged to it). ``torch_symm_mem:all_to_all_vdev_2d`` (``..._fp8``)
is the same over PyTorch's device-side 2-D all-to-all (NVSHMEM: splits on the device, rows arrive expert-major), run
only where the op exists and PyTorch's symmetric memory is on NVSHMEM (``TRITON_DIST_BACKEND=nvshmem``); elsewhere a
note says why it was skipped (always in the CPU world and in shared-GPU worlds).

``ep_normal`` (``--cases ep_normal``): the same three ops of :class:`triton_dist.moe.EPNormalContext` (provider
``triton_dist:ep_normal``, bf16; packed receive rows, the prefill kind) at ``--normal-tokens`` tokens per rank, against
the same ``torch_all_to_all`` (and symmetric-memory) baselines; ``y`` is its packed receive buffer.

``tp`` (``--cases tp``, any world): the tensor-parallel MoE layer on Qwen3-30B-A3B's shape (4096 tokens over the
ranks, hidden 2048, 128 experts of intermediate 768 split over the ranks, top-8, bf16): ``ops.ag_moe`` (the token
all-gather overlapped with the gate-up grouped GEMM), SiLU * up, ``ops.moe_rs`` (provider ``triton_dist:tp_moe``)
against :func:`torch_tp_moe` (``torch_nccl``: ``all_gather``, the pairs sorted by expert, ``torch._grouped_mm`` twice,
the weighted sum, ``reduce_scatter_tensor``), op ``tp_moe``, both checked against the layer in fp32 first; at world
size 1 it times the compute alone. ``tflops`` counts this rank's share of the layer's GEMMs, ``gbps`` its weights.

Timing: :func:`~triton_dist.bench.harness.time_call`, the slowest rank's median. Ours and the symmetric-memory
baseline (no host sync) are CUDA-graph replays of ``--graph-calls`` calls (what decode pays in a captured step);
``torch_all_to_all`` syncs with the host, so it cannot be captured and is timed call by call. ``gbps`` is the
per-rank payload over the median: every pair's row (``T * k`` rows, local ones included, as DeepEP counts),
``T * k * H`` elements each way (fp8 dispatch: ``H + H / 32`` bytes a row). Before timing, every provider's round
trip (dispatch, ``y`` = the received rows, combine) must equal, bit for bit (``torch.equal``), a torch reference
computed on the rank alone: each token's row (fp8: quantised and dequantised) summed over its top-k slots with the
weights in fp32 in slot order (:func:`~triton_dist.moe.combine_reference`); a mismatch is noted, not timed, and (for
ours) makes the command exit non-zero. In a shared-GPU world rows are marked ``shared_gpu`` (not performance).

Rows go to ``<out>/<card>.jsonl``; the tables pair each of our providers with its torch_all_to_all baseline and the
plot (``docs/perf/moe_<card>.png``) shows ours / baseline time per op. Unless ``TRITON_DIST_HEAP_SIZE`` is set, the
symmetric heap is sized for the largest context (:func:`heap_bytes_for`).
"""
from __future__ import annotations

import argparse
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._argtypes import positive_int
from .cores import CheckedBench, add_timing_args, timing_defaults
from .gemm import DTYPE_NAMES, _choices
from .harness import Recorder, agree, first_line, uniform
from .report import (SHARED_GPU_NO_SYMM_MEM, Progress, add_render_args, announce_shared_gpu, card_plot_path,
                     format_pair_tables, load_runs, plot_pairs, render_recorded)

CASES = ("ep_ll", "ep_normal", "tp")  # each a method of _MoEBench; ep_normal and tp run when asked (--cases)
DEFAULT_CASES = ("ep_ll",)
OPS = ("ep_dispatch", "ep_combine", "ep_round_trip")
TP_OP = "tp_moe"
# our providers and the baseline each is paired with in the tables and the plot
BASELINE = {"triton_dist:ep_ll": "torch_all_to_all", "triton_dist:ep_ll_fp8": "torch_all_to_all_fp8",
            "triton_dist:ep_normal": "torch_all_to_all", "triton_dist:tp_moe": "torch_nccl"}
NORMAL_TOKENS = 4096  # tokens per rank of the ep_normal case (prefill)
SYMM_MEM = "torch_symm_mem:all_to_all_vdev_2d"
GOAL = {op: 1.0 for op in OPS + (TP_OP,)}  # ours / baseline time at most
DEFAULT_PLOT = os.path.join("docs", "perf", "moe_{card}.png")
FP8_MODES = {"both": (False, True), "off": (False,), "only": (True,)}


@dataclass(frozen=True)
class EPCase:
    """One expert-parallel case: ``tokens`` per rank of ``hidden`` values, ``topk`` of ``experts`` experts each."""

    tokens: int = 128
    hidden: int = 7168
    topk: int = 8
    experts: int = 256

    def shape(self, world: int) -> str:
        """The rows' shape: ``T=128,H=7168,k=8,E=256,world=8``."""
        return f"T={self.tokens},H={self.hidden},k={self.topk},E={self.experts},world={world}"

    def payload_bytes(self, elem: int, fp8: bool) -> tuple[int, int]:
        """(dispatch, combine) bytes a rank sends: a row per pair, ``H`` elements (fp8 dispatch: ``H`` bytes and an
        fp32 scale per 128)."""
        pairs = self.tokens * self.topk
        row = self.hidden + 4 * (self.hidden // 128) if fp8 else self.hidden * elem
        return pairs * row, pairs * self.hidden * elem


@dataclass(frozen=True)
class TPCase:
    """One tensor-parallel case (Qwen3-30B-A3B's MoE layer by default): ``tokens`` over all ranks (each holds
    ``tokens / world``), ``hidden``, ``inter`` the intermediate size of each expert (each rank ``inter / world`` of
    it, gate and up fused), ``topk`` of ``experts``."""

    tokens: int = 4096
    hidden: int = 2048
    inter: int = 768
    topk: int = 8
    experts: int = 128

    def shape(self, world: int) -> str:
        """``T=4096,H=2048,I=768,k=8,E=128,world=8``."""
        return f"T={self.tokens},H={self.hidden},I={self.inter},k={self.topk},E={self.experts},world={world}"

    def flops(self) -> int:
        """The layer's GEMM FLOPs over all ranks: every pair through gate-up (``2 I`` columns) and down."""
        return 2 * self.tokens * self.topk * self.hidden * 3 * self.inter


def smoke_case(world: int) -> EPCase:
    """``--smoke``'s tiny case: 4 tokens of 128 values, top-2 of 2 experts per rank."""
    return EPCase(4, 128, 2, 2 * world)


def routing(tokens: int, topk: int, experts: int, seed: int):
    """``[tokens, topk]`` int64: ``topk`` distinct random experts per token, from ``seed`` (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((tokens, experts), generator=g).argsort(dim=1)[:, :topk].contiguous()


def context_bytes(case: EPCase, elem: int, fp8: bool) -> int:
    """Symmetric bytes per rank of an :class:`~triton_dist.moe.EPLowLatencyContext` of ``case`` (its buffers; they
    do not depend on the world size but for a few counters)."""
    e, m, h, k = case.experts, case.tokens, case.hidden, case.topk
    d_buf = 2 * e * m * h * (1 if fp8 else elem) + (2 * e * m * (h // 128) * 4 if fp8 else 4)
    return d_buf + 2 * e * m * 4 + 2 * e * 4 + 2 * m * k * h * elem + (1 << 16)


def normal_context_bytes(case: EPCase, elem: int, world: int) -> int:
    """Symmetric bytes per rank of an :class:`~triton_dist.moe.EPNormalContext` of ``case`` (default capacity)."""
    pairs = case.tokens * case.topk
    rows = min(2 * pairs, world * pairs)
    return 2 * rows * (case.hidden * elem + 8) + 2 * pairs * case.hidden * elem + (1 << 20)


def heap_bytes_for(case: EPCase, elem: int, fp8_modes, normal: EPCase | None = None, world: int = 1) -> int:
    """Symmetric heap for the run: the largest context (one at a time: each is closed after its rows; ``normal``:
    the ep_normal case's too) with room to spare; at least 2 GiB."""
    need = max(context_bytes(case, elem, fp8) for fp8 in fp8_modes)
    if normal is not None:
        need = max(need, normal_context_bytes(normal, elem, world))
    return max(2 << 30, need * 5 // 4 + (256 << 20))


def dequantize(values, scales, dtype):
    """fp8 rows back to ``dtype``: ``values`` [..., H] (e4m3) times their ``scales`` [..., H/128] (fp32)."""
    return (values.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2).to(dtype)


def _first_call(check, call):
    """``call``, except that its first call runs ``check``: :meth:`CheckedBench._time` checks a provider by the result
    of its first call, and a dispatch alone has no result comparable across providers (their layouts differ), so the
    dispatch's check is a whole round trip from a fresh dispatch (which also prepares what the combine rows use)."""
    first = [True]

    def run(i):
        if first[0]:
            first[0] = False
            return check()
        return call(i)
    return run


# ---------------------------------------------------------------------------------------------- providers
class _Ours:
    """``triton_dist:ep_ll`` (``_fp8``): dispatch and combine of an EPLowLatencyContext; ``triton_dist:ep_normal``:
    of an EPNormalContext (its packed receive buffer is ``y``)."""

    def __init__(self, ctx, x, ids, weights):
        self.ctx, self.x, self.ids, self.weights = ctx, x, ids, weights
        self.fp8 = getattr(ctx, "fp8", False)
        kind = "ep_normal" if ctx.op == "ep_normal" else "ep_ll"
        self.name = f"triton_dist:{kind}" + ("_fp8" if self.fp8 else "")
        self.out = torch.empty_like(x)
        self.y = self.handle = None

    def prepare(self):
        """One round trip: dispatch, ``y`` = the received rows (dequantised with fp8), combine; keeps ``y`` and the
        handle for :meth:`combine` and :meth:`round_trip`."""
        recv, _, self.handle = self.ctx.dispatch(self.x, self.ids)
        self.y = dequantize(recv[0], recv[1], self.x.dtype) if self.fp8 else recv
        return self.combine()

    def dispatch(self):
        """The dispatch alone: ``(recv_x, recv_count, handle)``."""
        return self.ctx.dispatch(self.x, self.ids)

    def combine(self):
        """The combine alone, of the prepared ``y`` and handle: ``out`` [T, H]."""
        return self.ctx.combine(self.y, self.ids, self.weights, self.handle, out=self.out)

    def round_trip(self):
        """A dispatch, then the combine of the prepared ``y`` with the new handle: ``out`` [T, H]."""
        _, _, handle = self.ctx.dispatch(self.x, self.ids)
        return self.ctx.combine(self.y, self.ids, self.weights, handle, out=self.out)


class _TorchAllToAll:
    """``torch_all_to_all`` (``_fp8``): the pairs sorted by expert, counts and rows by ``all_to_all_single`` (a host
    sync between), the reverse for the combine, then the weighted sum in torch."""

    def __init__(self, x, ids, weights, experts: int, group, fp8: bool):
        self.x, self.ids, self.weights, self.experts, self.group, self.fp8 = x, ids, weights, experts, group, fp8
        self.world = dist.get_world_size(group)
        self.flat = ids.reshape(-1).long()
        self.name = "torch_all_to_all_fp8" if fp8 else "torch_all_to_all"
        self.y = self.meta = None

    def payload(self):
        """The rows as sent: ``x`` (fp8: its quantised values, then its fp32 scales, as one uint8 row per token)."""
        if not self.fp8:
            return self.x
        from triton_dist import moe
        v, s = moe.quantize_fp8_reference(self.x)
        return torch.cat([v.view(torch.uint8), s.view(torch.uint8)], dim=1)

    def as_y(self, rows):
        """The experts' input as ``y`` (no expert compute): the received rows, dequantised with fp8."""
        if not self.fp8:
            return rows
        h = self.x.shape[1]
        return dequantize(rows[:, :h].contiguous().view(torch.float8_e4m3fn),
                          rows[:, h:].contiguous().view(torch.float32), self.x.dtype)

    def sorted_rows(self):
        """``(order, rows, counts)``: the pairs in expert order (stable: pair order within an expert), their rows and
        the pairs per expert (``[W * L]``, rank-major)."""
        order = torch.argsort(self.flat, stable=True)
        rows = self.payload()[torch.div(order, self.ids.shape[1], rounding_mode="floor")]
        counts = torch.zeros(self.experts, dtype=torch.int64, device=self.flat.device)
        counts.scatter_add_(0, self.flat, torch.ones_like(self.flat))  # no host sync (bincount sizes on the host)
        return order, rows, counts

    def weighted_sum(self, order, back):
        """``out[t] = sum_j w[t, j] * row(t, j)`` (fp32, slot order) from the rows back in expert order."""
        from triton_dist import moe
        t, k = self.ids.shape
        pair = torch.empty((t * k, back.shape[1]), dtype=back.dtype, device=back.device)
        pair[order] = back
        return moe.combine_reference(pair.view(t, k, -1), self.ids, self.weights, self.x.dtype)

    def prepare(self):
        """One round trip, keeping ``y`` (the received rows) and the dispatch's splits for :meth:`combine`."""
        recv, self.meta = self.dispatch()
        self.y = self.as_y(recv)
        return self.combine()

    def dispatch(self):
        """The dispatch alone: ``(received rows, (order, send splits, receive splits))``."""
        order, rows, counts = self.sorted_rows()
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # each source's pairs for each of my experts
        per_rank = torch.stack([counts.view(self.world, -1).sum(1), recv_counts.view(self.world, -1).sum(1)])
        send, recv_n = per_rank.cpu().tolist()  # the host sync: the receive buffer's size and the splits
        recv = torch.empty((sum(recv_n), rows.shape[1]), dtype=rows.dtype, device=rows.device)
        dist.all_to_all_single(recv, rows, recv_n, send, group=self.group)
        return recv, (order, send, recv_n)

    def combine(self, meta=None):
        """The combine of the prepared ``y`` (by the splits of ``meta``, default the prepared dispatch's): ``out``."""
        order, send, recv_n = meta or self.meta
        back = torch.empty((sum(send), self.y.shape[1]), dtype=self.y.dtype, device=self.y.device)
        dist.all_to_all_single(back, self.y, send, recv_n, group=self.group)
        return self.weighted_sum(order, back)

    def round_trip(self):
        """A dispatch, then the combine of the prepared ``y`` by its splits: ``out`` [T, H]."""
        _, meta = self.dispatch()
        return self.combine(meta)


class _SymmMem2D(_TorchAllToAll):
    """``torch_symm_mem:all_to_all_vdev_2d`` (``_fp8``): the same pairs by ``torch.ops.symm_mem.all_to_all_vdev_2d``
    (splits on the device, rows arrive expert-major) and back by ``all_to_all_vdev_2d_offset``; no host sync."""

    def __init__(self, x, ids, weights, experts: int, group, fp8: bool):
        import torch.distributed._symmetric_memory as symm_mem
        super().__init__(x, ids, weights, experts, group, fp8)
        self.name = SYMM_MEM + ("_fp8" if fp8 else "")
        self.gname = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.gname)
        t, k = ids.shape
        h, dev = x.shape[1], x.device
        width, kind = (h + 4 * (h // 128), torch.uint8) if fp8 else (h, x.dtype)
        cap = self.world * t * k + experts // self.world  # every rank's pairs, and a padding row per empty expert
        i64 = torch.int64
        self.inp = symm_mem.empty((t * k, width), dtype=kind, device=dev)
        self.recv = symm_mem.empty((cap, width), dtype=kind, device=dev)
        self.in_splits = symm_mem.empty((experts,), dtype=i64, device=dev)
        self.recv_so = symm_mem.empty((2, experts), dtype=i64, device=dev)
        self.y_buf = symm_mem.empty((cap, h), dtype=x.dtype, device=dev)
        self.back = symm_mem.empty((t * k, h), dtype=x.dtype, device=dev)
        self.back_so = symm_mem.empty((2, experts), dtype=i64, device=dev)
        for b in (self.inp, self.recv, self.in_splits, self.recv_so, self.y_buf, self.back, self.back_so):
            symm_mem.rendezvous(b, self.gname)
        self.order = None

    def prepare(self):
        """One round trip, ``y`` (the received rows) copied into the symmetric combine input."""
        self.y_buf.copy_(self.as_y(self.dispatch()))
        self.y = self.y_buf
        return self.combine()

    def dispatch(self):
        """The dispatch alone: the symmetric receive buffer (expert-major rows)."""
        self.order, rows, counts = self.sorted_rows()
        self.inp.copy_(rows)
        self.in_splits.copy_(counts)
        torch.ops.symm_mem.all_to_all_vdev_2d(self.inp, self.recv, self.in_splits, self.recv_so, self.gname)
        return self.recv

    def combine(self, meta=None):
        """The combine of the prepared ``y`` by the last dispatch's splits and offsets: ``out`` [T, H]."""
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.y_buf, self.back, self.recv_so, self.back_so, self.gname)
        return self.weighted_sum(self.order, self.back)

    def round_trip(self):
        """A dispatch, then the combine of the prepared ``y``: ``out`` [T, H]."""
        self.dispatch()
        return self.combine()


def symm_mem_skip_reason(world) -> str | None:
    """Why ``torch_symm_mem:all_to_all_vdev_2d`` cannot run in ``world`` (None: it may)."""
    if world.interpreted:
        return "PyTorch's symmetric memory needs CUDA (the CPU world)"
    if getattr(world, "shared_gpu", False):
        return SHARED_GPU_NO_SYMM_MEM
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d"):
        return f"this PyTorch ({torch.__version__}) has no torch.ops.symm_mem.all_to_all_vdev_2d"
    if world.backend != "nvshmem":
        return "it needs PyTorch's symmetric memory on NVSHMEM: run with TRITON_DIST_BACKEND=nvshmem"
    return None


def gate_up_act(h: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of fused gate-up rows ``[*, 2 I]`` (gate first), in fp32, cast back."""
    gate, up = h.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def _grouped(rows, w, offsets, counts):
    """``rows`` (expert-sorted) times each expert's ``w`` [E, K, N]: ``torch._grouped_mm`` where torch has it for
    these operands, else a loop over the experts (a host sync for the counts)."""
    from triton_dist.kernels.grouped_gemm import torch_grouped_mm
    out, _ = torch_grouped_mm(rows, w, offsets)
    if out is not None:
        return out
    out = torch.empty((rows.shape[0], w.shape[2]), dtype=rows.dtype, device=rows.device)
    lo = 0
    for e, n in enumerate(counts.tolist()):
        out[lo:lo + n] = rows[lo:lo + n] @ w[e]
        lo += n
    return out


def torch_tp_moe(x, w1, w2, ids, wts, group):
    """The sequential torch + NCCL tensor-parallel MoE layer: all-gather of the tokens and their routing, the pairs
    sorted by expert, the grouped gate-up GEMM, SiLU * up, the grouped down GEMM, the top-k weighted sum (fp32), the
    reduce-scatter of the tokens to their ranks."""
    world = dist.get_world_size(group)

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)
    xs, idg, wg = gather(x), gather(ids), gather(wts)
    t, k = idg.shape
    flat = idg.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w1.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    rows = xs[torch.div(order, k, rounding_mode="floor")]
    y = _grouped(gate_up_act(_grouped(rows, w1, offsets, counts)), w2, offsets, counts)
    pair = torch.empty_like(y)
    pair[order] = y
    full = (pair.view(t, k, -1).float() * wg.float()[..., None]).sum(1)
    if x.device.type == "cuda":
        out = torch.empty((t // world, full.shape[1]), dtype=full.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, full, group=group)
    else:  # gloo has no reduce_scatter_tensor
        dist.all_reduce(full, group=group)
        out = full[dist.get_rank(group) * (t // world):(dist.get_rank(group) + 1) * (t // world)].clone()
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- the bench
class _MoEBench(CheckedBench):
    def tp(self, case: TPCase) -> None:
        """The tensor-parallel layer: ``ops.ag_moe`` (tokens gathered while the gate-up GEMM runs), SiLU * up,
        ``ops.moe_rs`` against :func:`torch_tp_moe`, both checked against the layer in fp32 first."""
        from triton_dist import ops
        w = self.world
        W = w.world_size
        t_loc, i_loc = case.tokens // W, case.inter // W
        shape = case.shape(W)
        seed = zlib.crc32(shape.encode()) + 1009 * w.rank
        x = self.rand((t_loc, case.hidden), seed)
        ids = routing(t_loc, case.topk, case.experts, seed).to(w.device)
        wts = uniform((t_loc, case.topk), seed + 1, torch.float32, w.device)
        w1 = self.rand((case.experts, case.hidden, 2 * i_loc), seed + 2, case.hidden ** -0.5)
        w2 = self.rand((case.experts, i_loc, case.hidden), seed + 3, case.inter ** -0.5)
        ref = torch_tp_moe(x.float(), w1.float(), w2.float(), ids, wts, w.group).float()
        tol = 3e-2 * ref.abs().max().item() + 1e-3

        def ours(i):
            h, plan = ops.ag_moe(x, w1, ids, wts)
            return ops.moe_rs(gate_up_act(h), w2, plan)

        providers = [("triton_dist:tp_moe", ours), ("torch_nccl", lambda i: torch_tp_moe(x, w1, w2, ids, wts, w.group))]
        self._time(TP_OP, shape, providers, ref, tol, 1, nbytes=2 * case.experts * case.hidden * 3 * i_loc,
                   flops=case.flops() // W, graph=0)


    def ep(self, case: EPCase, fp8: bool, symm_mem_skip: str | None, normal: bool = False) -> None:
        """One ``ep_ll`` case (bf16 or fp8 dispatch) or, with ``normal``, the ``ep_normal`` case: ours and the
        baselines, each checked, then their three ops timed."""
        from triton_dist import moe
        w = self.world
        W, T, H, K, E = w.world_size, case.tokens, case.hidden, case.topk, case.experts
        shape = case.shape(W)
        seed = zlib.crc32(shape.encode()) + 1009 * w.rank
        x = self.rand((T, H), seed)
        ids = routing(T, K, E, seed).to(w.device)
        weights = uniform((T, K), seed + 1, torch.float32, w.device)
        rows = x
        if fp8:
            rows = dequantize(*moe.quantize_fp8_reference(x), x.dtype)
        ref = moe.combine_reference(rows[:, None, :].expand(T, K, H), ids, weights, x.dtype).float()

        ctx = moe.EPNormalContext(T, H, K, E, x.dtype) if normal else moe.EPLowLatencyContext(T, H, K, E, x.dtype,
                                                                                            fp8=fp8)
        providers = [(_Ours(ctx, x, ids, weights), True), (_TorchAllToAll(x, ids, weights, E, w.group, fp8), False)]
        if symm_mem_skip is None:
            err, prov = None, None
            try:
                prov = _SymmMem2D(x, ids, weights, E, w.group, fp8)
            except Exception as e:  # noqa: BLE001  (a baseline that cannot start is skipped, with a note)
                err = first_line(e)
            failed = agree(err, w.group)
            if failed:
                self.note(f"{shape} {SYMM_MEM}: skipped: {'; '.join(failed)}")
            else:
                providers.append((prov, True))
        graph = self.args.graph_calls if self.gpu else 0
        d_bytes, c_bytes = case.payload_bytes(self.elem, fp8)
        ops = (("ep_dispatch", lambda p: _first_call(p.prepare, lambda i: p.dispatch()), d_bytes),
               ("ep_combine", lambda p: lambda i: p.combine(), c_bytes),
               ("ep_round_trip", lambda p: lambda i: p.round_trip(), d_bytes + c_bytes))
        for op, make, nbytes in ops:
            for p, capturable in providers:
                self._time(op, shape, [(p.name, make(p))], ref, 0.0, 1, nbytes=nbytes, flops=None,
                           graph=graph if capturable else 0)
        providers.clear()
        ctx.close()


# ---------------------------------------------------------------------------------------------- report
def moe_pairs(rows: list[dict]) -> dict:
    """``{op: {label: (ours_us, baseline_us, ours_row)}}``: each of our providers against its baseline (label: the
    shape, plus ``[fp8]`` for the fp8 dispatch, ``[normal]`` for ep_normal); a later row of the same (op, shape,
    provider) replaces an earlier one."""
    cells: dict = {}
    for r in rows:
        if r.get("op") not in OPS + (TP_OP,):
            continue
        cells.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    out: dict = {}
    for (op, shape), c in cells.items():
        for ours, base in BASELINE.items():
            if ours in c and base in c:
                label = shape + (" [fp8]" if ours.endswith("_fp8") else " [normal]" if "ep_normal" in ours else "")
                out.setdefault(op, {})[label] = (c[ours]["median_us"], c[base]["median_us"], c[ours])
    return {op: out[op] for op in OPS + (TP_OP,) if op in out}


def load_moe_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The MoE rows of a ``<card>.jsonl``, of the runs ``run_id`` (one id or a comma list; default all)."""
    rows = load_runs(path, lambda r: r.get("op") in OPS, run_id)
    if not moe_pairs(rows):
        raise ValueError(f"{path} holds no MoE rows" + (f" of run(s) {run_id}" if run_id else ""))
    return rows


def _baseline_name(op: str) -> str:
    return "torch_nccl" if op == TP_OP else "torch_all_to_all"


def format_moe_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """Per op: each shape's time, its baseline's (``[fp8]`` rows: torch_all_to_all_fp8's), the ratio, the payload
    rate and whether it meets the goal."""
    def rate(op, r):
        return "" if r.get("gbps") is None else f"  {r['gbps']:8.1f} GB/s"
    return format_pair_tables(moe_pairs(rows), GOAL, _baseline_name, rate, 46, notes)


def default_plot_path(card: str) -> str:
    """``docs/perf/moe_<card>.png``."""
    return card_plot_path(DEFAULT_PLOT, card)


def plot_moe_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """One panel per op: ours / baseline time per shape, the goal as a line. PNG at ``path``, or None (a printed
    note) without matplotlib or rows."""
    return plot_pairs(moe_pairs(rows), rows, path, GOAL, _baseline_name, "MoE", title)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``triton-dist bench moe``."""
    ap = argparse.ArgumentParser(prog="triton-dist bench moe", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of <card>.jsonl [default: bench/results; --smoke: none]")
    ap.add_argument("--cases", type=_choices(CASES), default=list(DEFAULT_CASES),
                    help="comma-separated subset of " + ",".join(CASES) + " [default: ep_ll]")
    ap.add_argument("--normal-tokens", type=positive_int, default=NORMAL_TOKENS,
                    help=f"tokens per rank of the ep_normal case [default: {NORMAL_TOKENS}]")
    d = EPCase()
    ap.add_argument("--tokens", type=positive_int, default=d.tokens, help=f"tokens per rank [default: {d.tokens}]")
    ap.add_argument("--hidden", type=positive_int, default=d.hidden, help=f"values per token [default: {d.hidden}]")
    ap.add_argument("--topk", type=positive_int, default=d.topk, help=f"experts per token [default: {d.topk}]")
    ap.add_argument("--experts", type=positive_int, default=d.experts,
                    help=f"experts, a multiple of the world size [default: {d.experts}]")
    ap.add_argument("--fp8", choices=tuple(FP8_MODES), default="both",
                    help="rows with the bf16 dispatch, the fp8 one (triton_dist:ep_ll_fp8) or both [default: both]")
    add_timing_args(ap)
    add_render_args(ap, DEFAULT_PLOT.format(card="<card>"))
    return ap


def main(argv=None) -> None:
    """``triton-dist bench moe``: run the cases (or ``--render`` a recorded run)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_moe_rows, format_moe_tables, plot_moe_rows, default_plot_path)
        return
    timing_defaults(ap, args)
    import triton_dist
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    fp8_modes = FP8_MODES[args.fp8]
    case = EPCase(args.tokens, args.hidden, args.topk, args.experts)
    normal = EPCase(args.normal_tokens, args.hidden, args.topk, args.experts) if "ep_normal" in args.cases else None
    if args.topk > args.experts:
        ap.error(f"--topk {args.topk} is more than --experts {args.experts}")
    if any(fp8_modes) and args.hidden % 128 and not args.smoke:
        ap.error(f"the fp8 dispatch needs --hidden a multiple of 128 (got {args.hidden}); or --fp8 off")
    heap = None
    gpu_expected = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if gpu_expected and not args.smoke and not os.environ.get("TRITON_DIST_HEAP_SIZE") and \
            os.environ.get("TRITON_DIST_BACKEND", "auto").lower() in ("auto", "cuda"):
        heap = heap_bytes_for(case, torch.empty((), dtype=dtype).element_size(), fp8_modes, normal,
                              int(os.environ.get("WORLD_SIZE", "1")))
    world = triton_dist.init(heap_size=heap)
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench moe needs a GPU (the CPU world has no meaningful timings; --smoke runs "
                         "tiny shapes there as a plumbing check)")
    if args.smoke:
        case = smoke_case(world.world_size)
        normal = EPCase(2 * case.tokens, case.hidden, case.topk, case.experts) if normal else None
    if case.experts % world.world_size:
        raise SystemExit(f"--experts {case.experts} must be a multiple of the world size {world.world_size} (each "
                         "rank owns experts / world of them)")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    skip = symm_mem_skip_reason(world)
    per_case = len(OPS) * (2 + (skip is None)) * len(fp8_modes)
    normal_ops = len(OPS) * (2 + (skip is None)) * (normal is not None)
    progress = Progress(per_case * ("ep_ll" in args.cases) + normal_ops + 2 * ("tp" in args.cases),
                        enabled=world.rank == 0)
    bench = _MoEBench(world, rec, args, dtype, progress)
    if heap and world.rank == 0:
        progress.note(f"symmetric heap {heap / 2**30:.2f} GiB per rank (TRITON_DIST_HEAP_SIZE overrides)")
    if "ep_ll" in args.cases:
        if skip:
            bench.note(f"{SYMM_MEM} not run: {skip}")
        for fp8 in fp8_modes:
            bench.ep(case, fp8, skip)
    if normal is not None:
        bench.ep(normal, False, skip, normal=True)
    if "tp" in args.cases:
        tp = TPCase(4 * world.world_size, 64, 32 * world.world_size, 2, 4) if args.smoke else TPCase()
        if tp.tokens % world.world_size or tp.inter % world.world_size:
            raise SystemExit(f"the tp case needs tokens and inter divisible by the world size {world.world_size}")
        bench.tp(tp)
    progress.finish()
    bench.finish(args, lambda rows: format_moe_tables(rows) if moe_pairs(rows) else "", plot_moe_rows,
                 default_plot_path)


if __name__ == "__main__":
    main()
