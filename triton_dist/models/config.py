"""Model configs from Hugging Face ``config.json`` files (Qwen3, Qwen3-MoE, Llama 3), and the named shapes the
benchmarks use without any download (``qwen3-8b``, ``qwen3-32b``, ``qwen3-30b-a3b``, ``llama3-8b``)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "LlamaForCausalLM": "llama"}


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs of an HF config. ``kind``: ``qwen3`` (q / k norm), ``llama`` (none) or
    ``qwen3_moe`` (q / k norm, sparse MoE blocks on the layers ``moe_layers`` lists)."""

    kind: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    eos_token_id: int | tuple | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` has a sparse MoE block (HF Qwen3-MoE's rule) instead of a dense MLP."""
        return (self.kind == "qwen3_moe" and self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def qk_norm(self) -> bool:
        return self.kind in ("qwen3", "qwen3_moe")

    def weight_bytes(self, elem: int = 2) -> int:
        """Bytes of every weight (what one decode step reads at batch 1, MoE: every expert)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        total = 0
        for i in range(self.num_hidden_layers):
            mlp = (3 * h * self.moe_intermediate_size * self.num_experts + h * self.num_experts
                   if self.is_moe_layer(i) else 3 * h * self.intermediate_size)
            total += attn + mlp + 2 * h
        emb = self.vocab_size * h
        return elem * (total + emb * (1 if self.tie_word_embeddings else 2) + h)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a parsed ``config.json`` (transformers 4 or 5 key names: ``rope_theta`` or ``rope_parameters``,
        ``num_experts`` or ``num_local_experts``)."""
        arch = (cfg.get("architectures") or [None])[0]
        kind = ARCHITECTURES.get(arch) or {"qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "llama": "llama"}.get(
            cfg.get("model_type"))
        if kind is None:
            raise ValueError(f"unsupported model: architectures {cfg.get('architectures')}, model_type "
                             f"{cfg.get('model_type')!r} (supported: {sorted(ARCHITECTURES)})")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            kind=kind, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size", 0), num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            num_experts=cfg.get("num_experts", cfg.get("num_local_experts", 0)) if kind == "qwen3_moe" else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos, extra=cfg)

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        """From ``path/config.json``."""
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict:
        """An HF-style ``config.json`` dict (what :meth:`from_hf` reads back)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("kind", "extra")}
        d["architectures"] = [a for a, k in ARCHITECTURES.items() if k == self.kind]
        d["model_type"] = self.kind
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d


# Shapes of released checkpoints (their config.json values), for --random-weights runs without a download.
PRESETS = {
    "qwen3-8b": ModelConfig("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1e-6, 1e6, None, False, 40960,
                            eos_token_id=151645),
    "qwen3-32b": ModelConfig("qwen3", 151936, 5120, 25600, 64, 64, 8, 128, 1e-6, 1e6, None, False, 40960,
                             eos_token_id=151645),
    "qwen3-30b-a3b": ModelConfig("qwen3_moe", 151936, 2048, 6144, 48, 32, 4, 128, 1e-6, 1e6, None, False, 40960,
                                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                 norm_topk_prob=True, eos_token_id=151645),
    "llama3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, None, False, 8192,
                             eos_token_id=128001),
}


def resolve(model: str) -> tuple[ModelConfig, str | None]:
    """``(config, checkpoint directory or None)`` for a preset name or a directory holding ``config.json``."""
    if model in PRESETS:
        return PRESETS[model], None
    if os.path.isfile(os.path.join(model, "config.json")):
        return ModelConfig.from_dir(model), model
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with a "
                     "config.json")
