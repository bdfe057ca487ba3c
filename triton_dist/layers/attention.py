"""Tensor-parallel attention (Qwen3 / Llama): fused QKV projection, optional q / k RMSNorm, rotary embeddings, a KV
cache, our prefill and decode attention, the O projection.

Heads are split over the ranks (``Hq / W`` query heads, ``Hkv / W`` KV heads each; with fewer KV heads than ranks,
each group of ``W / Hkv`` ranks shares one). The checkpoint names are Hugging Face's (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``q_norm``, ``k_norm``); ``q_proj`` / ``k_proj`` / ``v_proj`` are views of one fused weight.

A call takes the flattened tokens of ``B`` sequences of ``S`` new tokens each (``S > 1``: prefill from position 0;
``S == 1``: a decode step) and a :class:`Step` with their positions and the KV lengths after this step, both on the
device, so one CUDA-graph capture of a decode step serves every step. ``ag_rs`` takes and returns this rank's token
shard; the attention itself always runs on all ``B * S`` tokens of this rank's heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _calls
from .norm import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from .parallel import ColumnParallelLinear, ParallelLayer, RowParallelLinear, Segment


@dataclass
class Step:
    """The tokens of one forward call: ``batch`` sequences of ``seq`` new tokens, ``positions`` [batch, seq] (int64,
    on the device), ``kv_lens`` [batch] (int32: each sequence's cached keys after this step, on the device)."""

    batch: int
    seq: int
    positions: torch.Tensor
    kv_lens: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def prefill(self) -> bool:
        return self.seq > 1


class KVCache:
    """One attention layer's keys and values for ``batch`` sequences of up to ``max_len`` tokens, this rank's
    ``kv_heads`` heads of ``head_dim``: contiguous ``[batch, max_len, kv_heads, head_dim]``, or paged (``page_size``:
    pages ``[num_pages, page_size, kv_heads, head_dim]`` and a ``block_table`` [batch, max_len / page_size] int32;
    sequence ``b``'s pages are ``b * pages_per_seq ..``, FlashInfer / vLLM's layout)."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device,
                 page_size: int | None = None):
        self.batch, self.max_len, self.page_size = batch, max_len, page_size
        if page_size:
            if max_len % page_size:
                raise ValueError(f"KVCache: max_len {max_len} must be a multiple of page_size {page_size}")
            per_seq = max_len // page_size
            shape = (batch * per_seq, page_size, kv_heads, head_dim)
            self.block_table = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
        else:
            shape = (batch, max_len, kv_heads, head_dim)
            self.block_table = None
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``k`` / ``v`` [B, S, kv_heads, D] at ``positions`` [B, S] (device indices: capturable)."""
        b = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)
        if self.block_table is None:
            self.k[b, positions] = k
            self.v[b, positions] = v
            return
        page = self.block_table[b, torch.div(positions, self.page_size, rounding_mode="floor")].long()
        slot = positions % self.page_size
        self.k[page, slot] = k
        self.v[page, slot] = v

    def rows(self, n: int) -> "KVCache":
        """The first ``n`` sequences as a cache sharing this one's storage (a smaller batch of the same caches)."""
        if n == self.batch:
            return self
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch = n
        if self.block_table is None:
            view.k, view.v = self.k[:n], self.v[:n]
        else:
            view.block_table = self.block_table[:n]
        return view

    def dense_view(self):
        """``(k, v)`` as [B, max_len, kv_heads, D] (a copy when paged: the torch baseline's decode)."""
        if self.block_table is None:
            return self.k, self.v
        shape = (self.batch, self.max_len) + tuple(self.k.shape[2:])
        return self.k[self.block_table.long()].reshape(shape), self.v[self.block_table.long()].reshape(shape)


class TPAttention(ParallelLayer):
    """Grouped-query attention with Hugging Face's parameter names (see the module docstring). ``qk_norm``: Qwen3's
    per-head RMSNorm of q and k before the rotary embedding (Llama has none)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope_theta: float,
                 rope_scaling: dict | None = None, qk_norm: bool = True, eps: float = 1e-6, dtype=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"TPAttention: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.hidden, self.head_dim = hidden, head_dim
        self.num_heads = self.heads = num_heads
        self.num_kv_heads = self.kv_heads = num_kv_heads
        self.scale = head_dim ** -0.5
        self.qkv = ColumnParallelLinear(hidden, segments=(
            Segment(num_heads * head_dim, "q_proj"), Segment(num_kv_heads * head_dim, "k_proj", head_dim),
            Segment(num_kv_heads * head_dim, "v_proj", head_dim)), dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj = self.qkv.parts
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, dtype) if qk_norm else None
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_theta, rope_scaling), persistent=False)

    def shard(self, par) -> None:
        super().shard(par)
        self.heads = par.split(self.num_heads, "the number of attention heads")
        _, kv_parts = self.qkv.segments[1].part(par)
        self.kv_heads = self.num_kv_heads // kv_parts

    def materialize(self, device, dtype) -> None:
        inv = self.inv_freq  # fp32, computed at construction: kept, not re-allocated
        super().materialize(device, dtype)
        self.inv_freq = inv.to(device)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        B, S, D = step.batch, step.seq, self.head_dim
        qkv = self.qkv(x)  # [B*S, (hq + 2 hkv) * D] (ag_rs: every rank's tokens)
        hq, hkv = self.heads, self.kv_heads
        if self.par.mode != "torch":  # one kernel: split, q / k norm, rotary, the cache write
            out = _calls.qk_norm_rope_cache(
                qkv, step.positions, self.inv_freq, cache.k, cache.v, num_heads=hq, num_kv_heads=hkv, seq=S,
                q_norm=self.q_norm.weight if self.q_norm is not None else None,
                k_norm=self.k_norm.weight if self.k_norm is not None else None,
                eps=self.q_norm.eps if self.q_norm is not None else 1e-6, block_table=cache.block_table,
                return_kv=step.prefill)
            q, k, v = (t.view(B, S, -1, D) for t in out) if step.prefill else (out.view(B, S, hq, D), None, None)
            return self.o_proj(self._attend(q, k, v, step, cache).reshape(B * S, hq * D))
        q, k, v = torch.split(qkv.view(B, S, hq + 2 * hkv, D), (hq, hkv, hkv), dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(self.inv_freq, step.positions, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.contiguous()
        cache.write(k, v, step.positions)
        o = self._attend(q, k, v, step, cache)  # [B, S, hq, D]
        return self.o_proj(o.reshape(B * S, hq * D))

    def _attend(self, q, k, v, step: Step, cache: KVCache) -> torch.Tensor:
        if self.par.mode == "torch":
            return self._attend_torch(q, k, v, step, cache)
        if step.prefill:
            return _calls.flash_attn(q, k, v, causal=True, scale=self.scale)
        o = _calls.flash_decode(q[:, 0].contiguous(), cache.k, cache.v, step.kv_lens, cache.block_table,
                                scale=self.scale)
        return o[:, None]

    def _attend_torch(self, q, k, v, step: Step, cache: KVCache) -> torch.Tensor:
        """The baseline: ``scaled_dot_product_attention`` (prefill: causal over the new tokens; decode: the whole
        cache, keys at or past each sequence's length masked)."""
        rep = self.heads // self.kv_heads
        if step.prefill:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1),
                                               is_causal=True, scale=self.scale)
            return o.transpose(1, 2)
        kc, vc = cache.dense_view()
        mask = torch.arange(cache.max_len, device=q.device)[None, :] < step.kv_lens[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2).repeat_interleave(rep, 1),
                                           vc.transpose(1, 2).repeat_interleave(rep, 1),
                                           attn_mask=mask[:, None, None, :], scale=self.scale)
        return o.transpose(1, 2)
