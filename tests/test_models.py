"""Models against Hugging Face ``transformers``: tiny random Qwen3, Llama and Qwen3-MoE checkpoints saved to a temp
directory (safetensors, HF's own ``save_pretrained``), loaded by our loader at TP=1 and TP=2 in every mode, and the
logits of a prefill and 8 decode steps compared with HF's forward over the whole sequence (fp32 on the CPU world;
each rank loads only its shards). Greedy tokens from the same logits are identical across modes. On GPUs (marked
``gpu``) bf16 too, judged against HF's own bf16 error."""
import pytest
import torch

from _util import this_world

transformers = pytest.importorskip("transformers")

from triton_dist.layers import MODES, Step, release_contexts  # noqa: E402
from triton_dist.models import loader  # noqa: E402
from triton_dist.models.config import ModelConfig  # noqa: E402
from triton_dist.models.qwen3 import build_model  # noqa: E402

B, PROMPT, DECODE = 2, 6, 8
TOL = dict(atol=2e-4, rtol=2e-4)


def _hf_model(kind: str):
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=64)
    if kind == "qwen3":
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=96, **common))
    elif kind == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=96, rope_theta=500000.0,
                                                                    **common))
    else:  # MoE layer 0, a dense MLP at layer 1 (mlp_only_layers)
        m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[1], **common))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.05) + (p.dim() == 1))
    return m.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: (directory, token ids [B, PROMPT + DECODE], HF logits [B, PROMPT + DECODE, vocab], HF's bf16 logits'
    largest error)}``."""
    out = {}
    for kind in ("qwen3", "llama", "qwen3_moe"):
        m = _hf_model(kind)
        path = str(tmp_path_factory.mktemp(kind))
        m.save_pretrained(path)
        ids = torch.randint(0, 96, (B, PROMPT + DECODE), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = m(ids).logits.float()
            bf16_err = float((m.to(torch.bfloat16)(ids).logits.float() - ref).abs().max())
        out[kind] = (path, ids, ref, bf16_err)
    return out


def _run(path, ids, mode, dtype=torch.float32, expert_parallel=False):
    """Prefill the prompt, then decode the given tokens one at a time: every step's logits, [B, T, vocab]."""
    cfg = ModelConfig.from_dir(path)
    w = this_world()
    model = build_model(cfg, mode=mode, device=w.device, dtype=dtype, expert_parallel=expert_parallel)
    loader.load_checkpoint(model, path)
    caches = model.new_caches(B, 32)
    ids = ids.to(w.device)
    pos = torch.arange(PROMPT, device=w.device)[None].expand(B, PROMPT)
    with torch.no_grad():
        logits = [model(ids[:, :PROMPT], Step(B, PROMPT, pos, torch.full((B,), PROMPT, dtype=torch.int32,
                                                                          device=w.device)), caches, all_logits=True)]
        for t in range(PROMPT, PROMPT + DECODE):
            step = Step(B, 1, torch.full((B, 1), t, device=w.device),
                        torch.full((B,), t + 1, dtype=torch.int32, device=w.device))
            logits.append(model(ids[:, t:t + 1], step, caches)[:, None])
    return torch.cat(logits, 1).float().cpu()


def _all_modes(path, ids, ref, dtype=torch.float32, expert_parallel=False, modes=MODES):
    out = {}
    for mode in modes:
        got = _run(path, ids, mode, dtype, expert_parallel)
        # logits of positions 0 .. PROMPT-1 from the prefill, then each decode step's
        out[mode] = (torch.allclose(got, ref, **TOL),
                     float((got - ref).abs().max()), got.argmax(-1))
    release_contexts()  # the session's world is shared with other tests: leave its heap empty
    return out


# At one rank the modes other than torch run the same code (our kernels, nothing to reduce): two suffice.
@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen3_moe"])
def test_matches_transformers_one_rank(world1, checkpoints, kind):
    path, ids, ref, _ = checkpoints[kind]
    res = world1.run(_all_modes, path, ids, ref, torch.float32, False, ("torch", "allreduce"))[0]
    assert all(ok for ok, _, _ in res.values()), {m: err for m, (_, err, _) in res.items()}
    greedy = [g for _, _, g in res.values()]
    assert all(torch.equal(g, greedy[0]) for g in greedy)


@pytest.mark.parametrize("kind,ep,modes", [("qwen3", False, MODES), ("qwen3_moe", False, ("torch", "ag_rs", "gemm_ar")),
                                           ("qwen3_moe", True, ("ag_rs", "allreduce"))],
                         ids=["qwen3", "qwen3_moe-tp", "qwen3_moe-ep"])
def test_matches_transformers_two_ranks(world2, checkpoints, kind, ep, modes):
    """TP=2, every mode of the dense model; the MoE model with its experts split by intermediate dimension (TPMoE;
    its MoE ops differ by sharding: ag_rs, and gemm_ar standing for the replicated modes) and by expert (EPMoE: with
    ag_rs the tokens go to their experts' ranks by the EP dispatch; allreduce: each rank its own experts)."""
    path, ids, ref, _ = checkpoints[kind]
    for res in world2.run(_all_modes, path, ids, ref, torch.float32, ep, modes):
        assert all(ok for ok, _, _ in res.values()), {m: err for m, (_, err, _) in res.items()}
        greedy = [g for _, _, g in res.values()]
        assert all(torch.equal(g, greedy[0]) for g in greedy)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen3_moe"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_bf16_within_transformers_own_error(worlds, checkpoints, kind, ranks):
    """bf16 on the GPU (one rank, and two sharing it): every mode's largest logit error against HF's fp32 at most
    3x (+ 0.02) that of HF's own bf16 forward."""
    from conftest import get_world
    path, ids, ref, bf16_err = checkpoints[kind]
    for res in get_world(worlds, ranks).run(_all_modes, path, ids, ref, torch.bfloat16):
        errs = {m: err for m, (_, err, _) in res.items()}
        assert all(e <= 3 * bf16_err + 0.02 for e in errs.values()), (errs, bf16_err)


def _compiled_step(path, ids, mode, expert_parallel=False):
    """A decode step of the whole model under ``torch.compile(fullgraph=True)`` (aot_eager) with the layers on the
    torch.library registrations, against the same step eager; the compiled graph holds our ops."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from triton_dist.layers import use_registered_ops
    w = this_world()
    model = build_model(ModelConfig.from_dir(path), mode=mode, device=w.device, dtype=torch.float32,
                        expert_parallel=expert_parallel)
    loader.load_checkpoint(model, path)
    ids = ids.to(w.device)
    use_registered_ops(True)
    try:
        caches = model.new_caches(B, 32)
        pos = torch.arange(PROMPT, device=w.device)[None].expand(B, PROMPT)
        lens = torch.full((B,), PROMPT, dtype=torch.int32, device=w.device)
        step = Step(B, 1, torch.full((B, 1), PROMPT, device=w.device), lens + 1)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        with torch.no_grad():
            model(ids[:, :PROMPT], Step(B, PROMPT, pos, lens), caches)
            want = model(ids[:, PROMPT:PROMPT + 1], step, caches)  # both write the same k / v at the same place
            got = compiled(ids[:, PROMPT:PROMPT + 1], step, caches)
        targets = {str(n.target).removesuffix(".default") for g in counter.graphs for n in g.graph.nodes}
        ours = sorted(t for t in targets if t.startswith("triton_dist."))
        return bool(torch.allclose(got, want, atol=1e-5, rtol=1e-5)), counter.frame_count, ours
    finally:
        use_registered_ops(False)
        release_contexts()


@pytest.mark.parametrize("kind,ranks,mode", [("qwen3", 1, "allreduce"), ("qwen3", 2, "ag_rs"),
                                             ("qwen3_moe", 2, "ag_rs")], ids=["tp1", "tp2-ag_rs", "ep2-ag_rs"])
def test_whole_model_compiles_with_our_ops(worlds, checkpoints, kind, ranks, mode):
    """The dense model at TP=1 and 2; the MoE model with its experts split by expert (EP dispatch / combine)."""
    from conftest import get_world
    path, ids, _, _ = checkpoints[kind]
    ep = kind == "qwen3_moe"
    for ok, frames, ours in get_world(worlds, ranks).run(_compiled_step, path, ids, mode, ep):
        assert ok and frames == 1, (ok, frames)
        want = {"triton_dist.qk_norm_rope_cache", "triton_dist.flash_decode", "triton_dist.add_rmsnorm"}
        if ranks > 1:
            want |= {"triton_dist.ag_gemm", "triton_dist.gemm_rs", "triton_dist.all_gather"}
        want |= {"triton_dist.ep_moe_dispatched"} if ep else {"triton_dist.silu_mul"}
        assert want <= set(ours), ours


def test_matches_transformers_four_ranks_sharing_kv_heads(worlds, checkpoints):
    """TP=4 with 2 KV heads: each pair of ranks holds the same KV head (the k / v rows of its group, replicated),
    one query head each."""
    from conftest import get_world
    path, ids, ref, _ = checkpoints["qwen3"]
    for res in get_world(worlds, 4).run(_all_modes, path, ids, ref, torch.float32, False, ("torch", "gemm_ar")):
        assert all(ok for ok, _, _ in res.values()), {m: err for m, (_, err, _) in res.items()}
        assert torch.equal(res["gemm_ar"][2], res["torch"][2])
