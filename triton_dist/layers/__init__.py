"""Layers: thin ``nn.Module``s over our ops with Hugging Face's parameter names, split over the ranks by
:func:`parallelize` (a model file holds no parallel code).

* :class:`ColumnParallelLinear`, :class:`RowParallelLinear` (:mod:`.parallel`, with the modes);
* :class:`TPAttention` with :class:`KVCache` and :class:`Step` (:mod:`.attention`);
* :class:`TPMLP` (:mod:`.mlp`), :class:`TPMoE` and :class:`EPMoE` (:mod:`.moe`), :class:`RMSNorm`,
  :class:`Embedding`.

Life cycle of a model made of these layers: built at full size on the ``meta`` device; :func:`parallelize` (this
rank's shard shapes and the mode); :func:`materialize` (uninitialised storage on the device); then the loader
(:mod:`triton_dist.models.loader`) fills :func:`named_tensor_shards`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._calls import use_registered_ops
from .attention import KVCache, Step, TPAttention
from .mlp import TPMLP, silu_mul
from .moe import EPMoE, TPMoE
from .norm import RMSNorm
from .parallel import (MODES, ColumnParallelLinear, Parallel, ParallelLayer, RowParallelLinear, Segment, TensorShard,
                       _param, check_mode)

__all__ = ["MODES", "ColumnParallelLinear", "EPMoE", "Embedding", "KVCache", "Parallel", "ParallelLayer", "RMSNorm",
           "RowParallelLinear", "Segment", "Step", "TPAttention", "TPMLP", "TPMoE", "TensorShard", "materialize",
           "named_tensor_shards", "parallelize", "release_contexts", "silu_mul", "use_registered_ops"]


class Embedding(ParallelLayer):
    """Token embeddings ``weight`` [vocab, hidden], replicated on every rank."""

    def __init__(self, vocab: int, hidden: int, dtype=None):
        super().__init__()
        self.weight = _param((vocab, hidden), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def parallelize(model: nn.Module, mode: str = "torch", par: Parallel | None = None, *,
                expert_parallel: bool = False) -> nn.Module:
    """Split every layer of ``model`` over the current world (``triton_dist.init()``; none: one device) in
    ``mode`` (:data:`MODES`); before :func:`materialize`. ``expert_parallel``: every :class:`TPMoE` becomes an
    :class:`EPMoE` (whole experts per rank). Returns ``model``."""
    check_mode("parallelize", mode)
    par = par or Parallel.current(mode)
    if expert_parallel:
        for m in list(model.modules()):
            for name, child in list(m.named_children()):
                if isinstance(child, TPMoE):
                    setattr(m, name, EPMoE.like(child))
    for name, m in model.named_modules():
        if isinstance(m, ParallelLayer):
            m.shard(par)
        elif next(m.parameters(recurse=False), None) is not None:
            raise TypeError(f"parallelize: {name or 'the model'} ({type(m).__name__}) holds parameters but is not a "
                            "ParallelLayer, so it cannot be split")
    model.par = par
    return model


def materialize(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Allocate every layer's storage on ``device`` (floating tensors in ``dtype``), uninitialised."""
    for m in model.modules():
        if isinstance(m, ParallelLayer):
            m.materialize(device, dtype)
    return model


def release_contexts() -> None:
    """Free the symmetric buffers the layers' ops keep between calls (the ops' cached contexts and the EP contexts
    the MoE layers share); collective. The next call makes them again."""
    from triton_dist import ops
    from .moe import release_ep_contexts
    release_ep_contexts()
    ops.release_contexts()


def _resolve(prefix: str, name: str) -> str:
    parts = prefix.split(".") if prefix else []
    while name.startswith("../"):
        parts, name = parts[:-1], name[3:]
    return ".".join(parts + [name])


def named_tensor_shards(model: nn.Module):
    """``(checkpoint name, TensorShard)`` of every tensor the model's layers hold, with full names (e.g.
    ``model.layers.0.self_attn.q_proj.weight``)."""
    for prefix, m in model.named_modules():
        if isinstance(m, ParallelLayer):
            for ts in m.tensor_shards():
                yield _resolve(prefix, ts.name), ts
