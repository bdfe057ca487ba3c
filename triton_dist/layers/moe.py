"""The sparse MoE block (Qwen3-MoE), split two ways: :class:`TPMoE` (a replicated router, every expert's
intermediate dimension split over the ranks) and :class:`EPMoE` (each rank holds ``E / W`` whole experts).

Names are Hugging Face's (transformers 5's in-memory layout): ``gate.weight`` [E, H] (the router),
``experts.gate_up_proj`` [E, 2 I, H] (gate rows, then up rows) and ``experts.down_proj`` [E, H, I]; the checkpoint
files' per-expert names (``experts.{j}.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I]) are what
:meth:`Experts.tensor_shards` lists for the loader. Each rank holds ``I / W`` of every expert.

Routing as HF's: ``softmax`` of the router logits in fp32, top-k, optionally renormalised (``norm_topk_prob``),
cast to the activations' dtype. Modes: ``torch`` (the experts by ``torch._grouped_mm`` on GPUs, a loop on the CPU,
then torch's all-reduce), ``allreduce`` / ``gemm_ar`` (:func:`triton_dist.ops.moe_gemm` then
:func:`triton_dist.ops.moe_ar`), ``ag_rs`` (:func:`triton_dist.ops.ag_moe` then :func:`triton_dist.ops.moe_rs` on the
token shards).

:class:`EPMoE`: with sequence-sharded activations (``ag_rs``) each rank's tokens go to their experts' ranks by the
expert-parallel dispatch (:class:`triton_dist.moe.EPNormalContext`: rows packed by expert at the receiver), the
local experts' grouped GEMMs run on the received rows, and the combine returns each pair's output to its token's
rank and sums it there (fp32). With replicated activations (``torch``, ``allreduce``, ``gemm_ar``) every rank already
holds every token: it computes its own experts' pairs only (the others' pairs are routed to an extra empty group the
GEMM skips) and the partial sums are all-reduced. One EP context serves every layer of a shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _calls
from .mlp import silu_mul
from .parallel import ParallelLayer, TensorShard, _param


class Router(ParallelLayer):
    """``gate``: the router's ``weight`` [E, H] (replicated)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool, dtype=None):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = _param((num_experts, hidden), dtype)

    def forward(self, x: torch.Tensor):
        """``(topk_ids [T, k] int64, topk_weights [T, k] in x's dtype)``."""
        probs = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top.to(x.dtype)


class Experts(ParallelLayer):
    """``experts``: every expert's gate | up rows and down columns, this rank's ``I / W`` of each."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, dtype=None):
        super().__init__()
        self.hidden, self.intermediate, self.num_experts = hidden, intermediate, num_experts
        self.local = intermediate
        self.gate_up_proj = _param((num_experts, 2 * intermediate, hidden), dtype)
        self.down_proj = _param((num_experts, hidden, intermediate), dtype)

    def shard(self, par) -> None:
        super().shard(par)
        self.local = i = par.split(self.intermediate, "moe_intermediate_size")
        self.gate_up_proj = _param((self.num_experts, 2 * i, self.hidden), self.gate_up_proj.dtype)
        self.down_proj = _param((self.num_experts, self.hidden, i), self.down_proj.dtype)

    def tensor_shards(self) -> list[TensorShard]:
        r, w, i = self.par.rank, self.par.world_size, self.local
        out = []
        for j in range(self.num_experts):
            out += [TensorShard(f"{j}.gate_proj.weight", self.gate_up_proj[j, :i], 0, r, w),
                    TensorShard(f"{j}.up_proj.weight", self.gate_up_proj[j, i:], 0, r, w),
                    TensorShard(f"{j}.down_proj.weight", self.down_proj[j], 1, r, w)]
        return out


def _torch_experts(x, w13, w2, ids, weights, valid=None):
    """The baseline's expert compute: pairs sorted by expert, ``torch._grouped_mm`` on GPUs (bf16), a loop over
    experts elsewhere; the weighted sum in fp32. ``w13`` [E, 2I, H], ``w2`` [E, H, I]; ``valid`` [T, k] (default
    all): the pairs to compute (the others add nothing). Returns [T, H] in fp32."""
    t, k = ids.shape
    e = w13.shape[0]
    flat = ids.reshape(-1) if valid is None else torch.where(valid, ids, e).reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x[torch.div(order, k, rounding_mode="floor")]
    counts = torch.zeros(e + 1, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)[:e]
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        offs = ends.to(torch.int32)
        h = silu_mul(torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs))
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    else:
        y = torch.zeros((rows.shape[0], w2.shape[1]), dtype=x.dtype, device=x.device)
        lo = 0
        for j, hi in enumerate(ends.tolist()):
            if hi > lo:
                y[lo:hi] = F.linear(silu_mul(F.linear(rows[lo:hi], w13[j])), w2[j])
            lo = hi
    pair = torch.empty_like(y)
    pair[order] = y
    pair = pair.view(t, k, -1).float()
    if valid is not None:  # rows past the last group are unspecified (torch._grouped_mm)
        pair = torch.where(valid[..., None], pair, 0.0)
    return (pair * weights.float()[..., None]).sum(1)


class TPMoE(ParallelLayer):
    """The sparse MoE block (``mlp`` of a Qwen3-MoE decoder layer): ``gate`` (router) and ``experts``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, norm_topk_prob: bool,
                 dtype=None):
        super().__init__()
        self.num_experts = num_experts
        self.gate = Router(hidden, num_experts, top_k, norm_topk_prob, dtype)
        self.experts = Experts(hidden, intermediate, num_experts, dtype)

    def forward(self, x: torch.Tensor, step=None) -> torch.Tensor:
        par, ex = self.par, self.experts
        ids, wts = self.gate(x)
        w13, w2 = ex.gate_up_proj, ex.down_proj
        if par.mode == "torch":
            return par.all_reduce(_torch_experts(x, w13, w2, ids, wts)).to(x.dtype)
        w1, w2k = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: the GEMM's K x N per expert
        if par.sequence_sharded:
            return _calls.tp_moe_ag_rs(x.contiguous(), w1, w2k, ids, wts)
        return _calls.tp_moe_ar(x.contiguous(), w1, w2k, ids, wts)


class EPExperts(Experts):
    """``experts`` of :class:`EPMoE`: this rank's ``E / W`` whole experts (``first`` is the first one's index)."""

    def shard(self, par) -> None:
        ParallelLayer.shard(self, par)
        self.count = n = par.split(self.num_experts, "num_experts (expert parallel)")
        self.first = par.rank * n
        self.gate_up_proj = _param((n, 2 * self.intermediate, self.hidden), self.gate_up_proj.dtype)
        self.down_proj = _param((n, self.hidden, self.intermediate), self.down_proj.dtype)

    def tensor_shards(self) -> list[TensorShard]:
        out = []
        for j in range(self.count):
            g = self.first + j
            out += [TensorShard(f"{g}.gate_proj.weight", self.gate_up_proj[j, :self.intermediate]),
                    TensorShard(f"{g}.up_proj.weight", self.gate_up_proj[j, self.intermediate:]),
                    TensorShard(f"{g}.down_proj.weight", self.down_proj[j])]
        return out


def release_ep_contexts() -> None:
    """Close the EP contexts the :class:`EPMoE` layers share (collective)."""
    from triton_dist.kernels.moe.ep_moe import release_ep_contexts as _release
    _release()


class EPMoE(ParallelLayer):
    """The sparse MoE block split by experts (module docstring); same names as :class:`TPMoE`, so the same
    checkpoints load. :func:`~triton_dist.layers.parallelize` with ``expert_parallel=True`` puts it in place of
    every :class:`TPMoE`."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, norm_topk_prob: bool,
                 dtype=None):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.gate = Router(hidden, num_experts, top_k, norm_topk_prob, dtype)
        self.experts = EPExperts(hidden, intermediate, num_experts, dtype)

    @classmethod
    def like(cls, tp: TPMoE) -> "EPMoE":
        """An EPMoE of a (not yet split) TPMoE's shapes."""
        ex = tp.experts
        return cls(ex.hidden, ex.intermediate, ex.num_experts, tp.gate.top_k, norm_topk_prob=tp.gate.norm_topk_prob,
                   dtype=ex.gate_up_proj.dtype)

    def forward(self, x: torch.Tensor, step=None) -> torch.Tensor:
        ids, wts = self.gate(x)
        if self.par.sequence_sharded:
            return self._dispatched(x, ids, wts)
        return self._local_experts(x, ids, wts)

    def _local_experts(self, x, ids, wts):
        """Replicated tokens: this rank's experts' pairs, the partial sums all-reduced."""
        par, ex = self.par, self.experts
        n, first = ex.count, ex.first
        if par.mode == "torch":
            local = (ids >= first) & (ids < first + n)
            part = _torch_experts(x, ex.gate_up_proj, ex.down_proj, torch.where(local, ids - first, 0),
                                  torch.where(local, wts.float(), 0.0), valid=local)
        else:
            part = _calls.ep_moe_local(x.contiguous(), ex.gate_up_proj, ex.down_proj, ids, wts, first)
        return par.all_reduce(part).to(x.dtype)

    def _dispatched(self, x, ids, wts):
        """Token shards: dispatch to the experts' ranks, the local grouped GEMMs, combine at the source."""
        ex = self.experts
        return _calls.ep_moe_dispatched(x.contiguous(), ex.gate_up_proj, ex.down_proj, ids, wts, self.num_experts)
