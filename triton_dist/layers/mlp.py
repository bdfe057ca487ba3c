"""The tensor-parallel SwiGLU MLP (Qwen3 / Llama): ``down(silu(gate(x)) * up(x))``, Hugging Face's names
``gate_proj`` / ``up_proj`` (views of one fused column-parallel weight) and ``down_proj`` (row-parallel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _calls
from .parallel import ColumnParallelLinear, ParallelLayer, RowParallelLinear, Segment


def silu_mul(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[.., 2 * I]`` gate | up row (HF's ``act_fn(gate) * up`` in the input dtype);
    ``fused``: one kernel (:func:`triton_dist.kernels.decoder.silu_mul`, rows of a 2-D tensor)."""
    if fused and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return _calls.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TPMLP(ParallelLayer):
    """Each rank holds ``intermediate / W`` of the gate, up and down projections; the down projection's partial sums
    are reduced by the mode (:mod:`.parallel`)."""

    def __init__(self, hidden: int, intermediate: int, *, dtype=None):
        super().__init__()
        self.gate_up = ColumnParallelLinear(hidden, segments=(Segment(intermediate, "gate_proj"),
                                                              Segment(intermediate, "up_proj")), dtype=dtype)
        self.gate_proj, self.up_proj = self.gate_up.parts
        self.down_proj = RowParallelLinear(intermediate, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor, step=None) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up(x), fused=self.par.mode != "torch"))
