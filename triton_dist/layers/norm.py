"""RMSNorm and rotary position embeddings, as Hugging Face's Qwen3 / Llama compute them (replicated: no split)."""
from __future__ import annotations

import math

import torch

from triton_dist.kernels.decoder import apply_rope, rope_cos_sin  # noqa: F401  (the layers' rotary, in torch)

from . import _calls
from .parallel import ParallelLayer, _param


class RMSNorm(ParallelLayer):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the statistics in fp32 and the product in ``x``'s dtype (HF's
    ``Qwen3RMSNorm`` / ``LlamaRMSNorm`` bit for bit on the same device). :meth:`add_norm` adds the residual first
    (one fused kernel outside the ``torch`` mode: :func:`triton_dist.kernels.decoder.add_rmsnorm`)."""

    def __init__(self, size: int, eps: float = 1e-6, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """``(norm(s), s)`` with ``s = x + residual`` (``x`` itself when ``residual`` is None): the decoder's
        pre-norm residual stream."""
        if self.par.mode != "torch" and x.dim() == 2 and x.stride(1) == 1:
            return _calls.add_rmsnorm(x, self.weight, self.eps, residual)
        s = x if residual is None else residual + x
        return self(s), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The rotary inverse frequencies ([head_dim / 2] fp32): ``theta ** (-2i / d)``, with Llama 3's long-context
    rescaling when ``scaling`` (``rope_scaling`` / ``rope_parameters`` of the config) says ``rope_type: llama3``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported (default and llama3 are)")
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, mid, scaled)


