"""Qwen3, Qwen3-MoE and Llama 3 decoder-only models, one code path, Hugging Face's module tree and names
(``model.embed_tokens``, ``model.layers.{i}.self_attn`` / ``mlp`` / ``input_layernorm`` /
``post_attention_layernorm``, ``model.norm``, ``lm_head``), so checkpoints load as they are.

No parallel code here: the layers (:mod:`triton_dist.layers`) split themselves when :func:`build_model` calls
:func:`~triton_dist.layers.parallelize`. A forward call takes token ids ``[B, S]`` and a
:class:`~triton_dist.layers.Step` (positions, KV lengths) and returns the logits of each sequence's last token
(``[B, vocab]``, fp32), or of every token with ``all_logits``.
"""
from __future__ import annotations

import torch
from torch import nn

from triton_dist.layers import (ColumnParallelLinear, Embedding, KVCache, ParallelLayer, RMSNorm, Step, TPAttention,
                                TPMLP, TPMoE, materialize, parallelize)
from triton_dist.layers.parallel import local_linear

from .config import ModelConfig


class TokenEmbedding(Embedding):
    """``embed_tokens``; with sequence-sharded activations (``ag_rs``) it embeds this rank's token shard only."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        par = self.par
        if par.sequence_sharded:
            n = par.split(flat.numel(), "the tokens of a call (ag_rs shards them; pad the batch)")
            flat = flat[par.rank * n:(par.rank + 1) * n]
        return super().forward(flat)


class LMHead(ColumnParallelLinear):
    """``lm_head``: ``weight`` [vocab, hidden] split by vocabulary rows (tied: this rank's rows of the embedding,
    no tensor of its own); the logits of the selected tokens with every rank's vocabulary gathered (fp32)."""

    def __init__(self, hidden: int, vocab: int, tied: Embedding | None = None, dtype=None):
        super().__init__(hidden, vocab, dtype=dtype)
        self.vocab = vocab
        self.tied = [tied] if tied is not None else None  # a list: not registered as a child
        if tied is not None:
            del self.weight

    def shard(self, par) -> None:
        if self.tied is None:
            super().shard(par)
        else:
            ParallelLayer.shard(self, par)

    def materialize(self, device, dtype) -> None:
        if self.tied is None:
            super().materialize(device, dtype)

    def tensor_shards(self):
        return [] if self.tied is not None else super().tensor_shards()

    def head_weight(self) -> torch.Tensor:
        """This rank's vocabulary rows of the projection."""
        if self.tied is None:
            return self.weight
        n = self.par.split(self.vocab, "vocab_size")
        return self.tied[0].weight[self.par.rank * n:(self.par.rank + 1) * n]

    def forward(self, x: torch.Tensor, step: Step, all_logits: bool = False) -> torch.Tensor:
        par = self.par
        if par.sequence_sharded:
            x = par.all_gather(x)
        if not all_logits:
            x = x.view(step.batch, step.seq, -1)[:, -1]
        logits = local_linear(x.contiguous(), self.head_weight(), par.mode).float()
        if par.world_size > 1:  # every rank's vocabulary rows, in rank order
            logits = par.all_gather(logits.t().contiguous()).t()
        return logits if not all_logits else logits.view(step.batch, step.seq, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = TPAttention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, qk_norm=cfg.qk_norm,
                                     eps=cfg.rms_norm_eps, dtype=dtype)
        if cfg.is_moe_layer(i):
            self.mlp = TPMoE(h, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                             norm_topk_prob=cfg.norm_topk_prob, dtype=dtype)
        else:
            self.mlp = TPMLP(h, cfg.intermediate_size, dtype=dtype)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: Step, cache: KVCache):
        """``(this layer's MLP output, the residual stream before it)``: the next norm adds them (fused)."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_norm(self.self_attn(h, step, cache), residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        super().__init__()
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, ids: torch.Tensor, step: Step, caches: list[KVCache]) -> torch.Tensor:
        x, residual = self.embed_tokens(ids), None
        for layer, cache in zip(self.layers, caches):
            x, residual = layer(x, residual, step, cache)
        return self.norm.add_norm(x, residual)[0]


class CausalLM(nn.Module):
    """``model`` (the decoder) and ``lm_head``; :meth:`new_caches` makes the KV caches a forward call takes."""

    def __init__(self, cfg: ModelConfig, dtype=torch.bfloat16):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, dtype)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size,
                              tied=self.model.embed_tokens if cfg.tie_word_embeddings else None, dtype=dtype)

    def forward(self, ids: torch.Tensor, step: Step, caches: list[KVCache], all_logits: bool = False):
        return self.lm_head(self.model(ids, step, caches), step, all_logits)

    def new_caches(self, batch: int, max_len: int, *, page_size: int | None = None) -> list[KVCache]:
        """One :class:`~triton_dist.layers.KVCache` per layer for this rank's KV heads (zeros)."""
        w = self.model.embed_tokens.weight
        return [KVCache(batch, max_len, layer.self_attn.kv_heads, layer.self_attn.head_dim, w.dtype, w.device,
                        page_size=page_size) for layer in self.model.layers]


def build_model(cfg: ModelConfig, *, mode: str = "torch", device="cpu", dtype=torch.bfloat16,
                expert_parallel: bool = False) -> CausalLM:
    """The model of ``cfg`` split over the current world in ``mode`` (MoE blocks by experts with
    ``expert_parallel``), with uninitialised storage on ``device`` (fill it with
    :func:`triton_dist.models.loader.load_checkpoint` or :func:`~.loader.init_random`)."""
    model = CausalLM(cfg, dtype)
    parallelize(model, mode, expert_parallel=expert_parallel)
    materialize(model, device, dtype)
    return model.eval()
