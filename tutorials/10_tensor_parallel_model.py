"""Tutorial 10: from a Hugging Face config to a tensor-parallel model, and how the modes differ.

Run it with ``triton-dist run -n 2 tutorials/10_tensor_parallel_model.py`` (any ``-n`` dividing the heads; GPUs when
present, otherwise a CPU world running the kernels under Triton's interpreter). It needs no download: it writes a tiny
random Qwen3 checkpoint (``config.json`` + ``model.safetensors``, Hugging Face's names) to a temp directory first.

**1. A plain model.** ``models/qwen3.py`` is the model with Hugging Face's module tree (``model.layers.{i}.self_attn``,
``mlp``, the norms, ``lm_head``) built from our layers, at full size and on the ``meta`` device (no memory). It holds
no parallel code.

**2. Parallelism applied to it.** :func:`triton_dist.layers.parallelize` walks the layers and gives each its shard
(Megatron's split; ``W`` ranks)::

    attention  q | k | v projection   column-parallel: Hq/W query heads, Hkv/W KV heads per rank (fused, one GEMM)
               o projection           row-parallel: each rank's heads' columns; partial sums added over ranks
    MLP        gate | up              column-parallel: I/W of the intermediate dimension
               down                   row-parallel
    MoE        experts                TPMoE: I/W of every expert; EPMoE: E/W whole experts
    lm_head    vocabulary rows        column-parallel, the logits gathered

Only the row-parallel layers communicate, once each per decoder layer half. The *mode* says how:

* ``torch``: activations replicated on every rank, ``F.linear`` then ``torch.distributed.all_reduce`` (the baseline);
* ``allreduce``: the same layout, our all-reduce, our decode GEMM for few rows, our fused decoder kernels (add +
  RMSNorm, q/k norm + rotary + KV-cache write, SiLU * up) and attention kernels;
* ``gemm_ar``: the row-parallel GEMM and the all-reduce fused (``ops.gemm_ar``: tiles reduced as they finish);
* ``ag_rs``: *sequence-sharded* activations, ``T / W`` tokens per rank between the layers: the column layers are
  ``ops.ag_gemm`` (the tokens all-gathered while the GEMM runs) and the row layers ``ops.gemm_rs`` (the partial sums
  reduce-scattered back to the token shards). Half the all-reduce's traffic per layer, and overlapped with the GEMM.

**3. Weights.** :func:`triton_dist.models.loader.load_checkpoint` asks every layer which part of which checkpoint
tensor it holds (a :class:`~triton_dist.layers.TensorShard`: name, target, dim, index of parts) and reads exactly
that slice of the memory-mapped safetensors file, so no rank ever holds a full copy.

**4. The same numbers.** Every mode computes the same function; the script runs a prefill and a few greedy decode
steps in each and checks that the logits agree (fp32 here) and the greedy tokens are identical.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

import triton_dist
from triton_dist.layers import MODES, Parallel, Step, materialize, parallelize
from triton_dist.models import loader
from triton_dist.models.config import ModelConfig
from triton_dist.models.qwen3 import CausalLM, build_model

TINY = ModelConfig("qwen3", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6)
BATCH, PROMPT, STEPS = 2, 6, 4


def write_checkpoint(path: str) -> None:
    """A random checkpoint in Hugging Face's layout: the full model's state dict with random values."""
    full = CausalLM(TINY, torch.float32)
    parallelize(full, "torch", par=Parallel("torch"))  # a split over one rank: full shapes
    materialize(full, "cpu", torch.float32)
    loader.init_random(full, seed=1, std=0.1)
    loader.save_checkpoint({k: v for k, v in full.state_dict().items()}, path, TINY.to_hf())


def generate(model: CausalLM, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill, then greedy decode: ``(logits of every step [B, STEPS + 1, vocab], tokens [B, STEPS])``."""
    caches = model.new_caches(BATCH, PROMPT + STEPS)
    pos = torch.arange(PROMPT, device=device)[None].expand(BATCH, PROMPT)
    step = Step(BATCH, PROMPT, pos, torch.full((BATCH,), PROMPT, dtype=torch.int32, device=device))
    logits = [model(ids, step, caches)]
    tokens = []
    for t in range(PROMPT, PROMPT + STEPS):
        tokens.append(logits[-1].argmax(-1))
        step = Step(BATCH, 1, torch.full((BATCH, 1), t, device=device),
                    torch.full((BATCH,), t + 1, dtype=torch.int32, device=device))
        logits.append(model(tokens[-1][:, None], step, caches))
    return torch.stack(logits, 1), torch.stack(tokens, 1)


def main() -> None:
    world = triton_dist.init()
    rank, W = world.rank, world.world_size
    path = [tempfile.mkdtemp(prefix="tutorial10_") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0, group=world.group)
    if rank == 0:
        write_checkpoint(path[0])
    world.barrier()
    cfg = ModelConfig.from_dir(path[0])  # what a real checkpoint directory gives
    ids = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(2)).to(world.device)
    results = {}
    for mode in MODES:
        model = build_model(cfg, mode=mode, device=world.device, dtype=torch.float32)
        loader.load_checkpoint(model, path[0])
        attn = model.model.layers[0].self_attn
        if rank == 0 and mode == MODES[0]:
            print(f"rank 0 holds {attn.heads} of {attn.num_heads} query heads, {attn.kv_heads} of "
                  f"{attn.num_kv_heads} KV heads; q_proj.weight {tuple(attn.q_proj.weight.shape)} of "
                  f"({attn.num_heads * attn.head_dim}, {cfg.hidden_size})")
        with torch.no_grad():
            results[mode] = generate(model, ids, world.device)
    base_logits, base_tokens = results["torch"]
    ok = True
    for mode, (logits, tokens) in results.items():
        err = float((logits - base_logits).abs().max())
        same = torch.equal(tokens, base_tokens)
        ok &= same and err < 1e-3
        if rank == 0:
            print(f"mode {mode:9s}: largest logit difference to torch {err:.2e}, greedy tokens "
                  f"{'identical' if same else 'DIFFERENT'}: {tokens[0].tolist()}")
    if rank == 0:
        print(f"{W} ranks, backend {world.backend}: every mode computes the same model")
        print(f"match: {'yes' if ok else 'no'}")
        for f in os.listdir(path[0]):
            os.remove(os.path.join(path[0], f))
        os.rmdir(path[0])
    triton_dist.finalize()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
