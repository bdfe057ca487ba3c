"""The tensor-parallel sparse MoE block (Qwen3-MoE): a replicated router, every expert's intermediate dimension
split over the ranks.

Names are Hugging Face's (transformers 5's in-memory layout): ``gate.weight`` [E, H] (the router),
``experts.gate_up_proj`` [E, 2 I, H] (gate rows, then up rows) and ``experts.down_proj`` [E, H, I]; the checkpoint
files' per-expert names (``experts.{j}.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I]) are what
:meth:`Experts.tensor_shards` lists for the loader. Each rank holds ``I / W`` of every expert.

Routing as HF's: ``softmax`` of the router logits in fp32, top-k, optionally renormalised (``norm_topk_prob``),
cast to the activations' dtype. Modes: ``torch`` (the experts by ``torch._grouped_mm`` on GPUs, a loop on the CPU,
then torch's all-reduce), ``allreduce`` / ``gemm_ar`` (:func:`triton_dist.ops.moe_gemm` then
:func:`triton_dist.ops.moe_ar`), ``ag_rs`` (:func:`triton_dist.ops.ag_moe` then :func:`triton_dist.ops.moe_rs` on the
token shards).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _torch_experts(x, w13, w2, ids, weights):
    """The baseline's expert compute: pairs sorted by expert, ``torch._grouped_mm`` on GPUs (bf16), a loop over
    experts elsewhere; the weighted sum in fp32. ``w13`` [E, 2I, H], ``w2`` [E, H, I]; returns [T, H] in fp32."""
    t, k = ids.shape
    e = w13.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x[torch.div(order, k, rounding_mode="floor")]
    counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        offs = ends.to(torch.int32)
        h = silu_mul(torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs))
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    else:
        y = torch.empty((rows.shape[0], w2.shape[1]), dtype=x.dtype, device=x.device)
        lo = 0
        for j, hi in enumerate(ends.tolist()):
            if hi > lo:
                y[lo:hi] = F.linear(silu_mul(F.linear(rows[lo:hi], w13[j])), w2[j])
            lo = hi
    pair = torch.empty_like(y)
    pair[order] = y
    return (pair.view(t, k, -1).float() * weights.float()[..., None]).sum(1)


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
        from triton_dist import ops
        w1, w2k = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: the GEMM's K x N per expert
        if par.sequence_sharded:
            h, plan = ops.ag_moe(x.contiguous(), w1, ids, wts)
            return ops.moe_rs(silu_mul(h), w2k, plan)
        plan = ops.moe_plan(ids, wts, self.num_experts)
        h = silu_mul(ops.moe_gemm(x.contiguous(), w1, plan))
        if par.world_size == 1:  # no world needed
            from triton_dist.kernels.moe import tp_moe as _tpm
            return _tpm.moe_ar(h, w2k, plan, ctx=None)
        return ops.moe_ar(h, w2k, plan)
