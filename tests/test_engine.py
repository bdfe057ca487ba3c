"""The generation engine on a tiny random Qwen3 (2 layers, hidden 64, head dim 64, vocab 96, fp32): greedy generation
equals a step-by-step loop of model forwards; the tokens are the same in every mode at TP=1 and TP=2 (ag_rs with
padded batches too) and on every rank; top-p sampling is deterministic for a seed; bad input raises ValueError; and
``triton-dist generate`` / ``bench e2e --smoke`` run end to end in a CPU world of two ranks."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _util import this_world
from triton_dist.layers import release_contexts
from conftest import BACKEND

# The command-line tests start a CPU world of their own (the interpreter), which the GPU image's numpy cannot run;
# the GPU suite runs the commands on the GPU instead (scripts/gpu_suite.sh).
cpu_world_only = pytest.mark.skipif(BACKEND != "cpu", reason="starts a CPU world; the GPU suite runs the GPU command")
from triton_dist.bench import e2e
from triton_dist.layers import MODES, Step
from triton_dist.models import loader
from triton_dist.models.engine import Engine, batch_buckets, sample_tokens
from triton_dist.models.generate import TINY
from triton_dist.models.qwen3 import build_model

ROOT = Path(__file__).resolve().parents[1]
CFG = TINY["tiny"]
P, GEN = 5, 3


def _model(mode="torch", cfg=CFG, device="cpu"):
    return loader.init_random(build_model(cfg, mode=mode, device=device, dtype=torch.float32), seed=1)


def _prompts(batch, length=P, seed=3):
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _manual(model, ids, gen_len, max_len=16):
    """Greedy tokens and every step's logits from plain forward calls on fresh caches."""
    b, p = ids.shape
    caches = model.new_caches(b, max_len)
    with torch.no_grad():
        logits = model(ids, Step(b, p, torch.arange(p)[None].expand(b, p), torch.full((b,), p, dtype=torch.int32)),
                       caches)
        toks, all_logits = [logits.argmax(-1)], [logits]
        for t in range(p, p + gen_len - 1):
            logits = model(toks[-1][:, None], Step(b, 1, torch.full((b, 1), t),
                                                   torch.full((b,), t + 1, dtype=torch.int32)), caches)
            toks.append(logits.argmax(-1))
            all_logits.append(logits)
    return torch.stack(toks, 1), all_logits


def test_greedy_generate_equals_step_by_step_forwards():
    model = _model()
    ids = _prompts(3)
    want, want_logits = _manual(model, ids, 6)
    engine = Engine(model, max_batch=4, max_len=16)
    res = engine.generate(ids, 6)
    assert torch.equal(res.tokens, want) and res.tokens.dtype == torch.int64
    assert len(res.step_ms) == 5 and res.prefill_ms > 0 and not res.graphed
    assert res.median_step_ms > 0 and res.p90_step_ms >= res.median_step_ms
    assert torch.equal(engine.generate(ids, 6).tokens, want)  # a second call starts over from position 0
    assert torch.equal(engine.generate(ids[:1], 6).tokens, want[:1])  # a smaller batch (bucket 1)
    logits = engine.prefill(ids)
    torch.testing.assert_close(logits, want_logits[0], atol=1e-5, rtol=1e-5)
    for t in range(1, 4):
        torch.testing.assert_close(engine.decode_step(want[:, t - 1]), want_logits[t], atol=1e-5, rtol=1e-5)
    paged = Engine(model, max_batch=3, max_len=16, page_size=4)
    assert torch.equal(paged.generate(ids, 6).tokens, want)


def test_failed_capture_falls_back_to_eager_steps(monkeypatch):
    """The GPU path's plumbing on the CPU: a capture that raises (here: no CUDA) leaves eager steps and a note; a graph
    is stale once an op's cached context it captured is replaced."""
    from triton_dist import ops
    from triton_dist.models.engine import _contexts, _Graph
    model = _model()
    ids = _prompts(2)
    engine = Engine(model, max_batch=2, max_len=16)
    engine.cuda_graphs = True
    res = engine.generate(ids, 4)
    assert torch.equal(res.tokens, _manual(model, ids, 4)[0]) and not res.graphed
    assert len(engine.notes) == 1 and "decode batch 2 (greedy): CUDA-graph capture failed (rank 0: " in engine.notes[0]
    engine.generate(ids, 4)
    assert len(engine.notes) == 1  # not tried again
    monkeypatch.setitem(ops._contexts, ("test_op", torch.float16), object())
    g = _Graph(None, None, None, _contexts())
    assert g.valid()
    monkeypatch.setitem(ops._contexts, ("test_op", torch.float16), object())
    assert not g.valid()


def test_stop_at_eos_pads_after_the_first_eos():
    ids = _prompts(2)
    want, _ = _manual(_model(), ids, 6)
    eos = tuple(sorted(set(want[:, 1].tolist())))  # every sequence meets one at step 1 at the latest
    res = Engine(_model(cfg=dataclasses.replace(CFG, eos_token_id=eos)), max_batch=2, max_len=16).generate(
        ids, 6, stop_at_eos=True)
    assert res.tokens.shape[1] <= 2 and len(res.step_ms) == res.tokens.shape[1] - 1
    for b in range(2):
        row, ref = res.tokens[b].tolist(), want[b].tolist()
        j = next(i for i, t in enumerate(ref) if t in eos)
        assert row == (ref[:j + 1] + [ref[j]] * len(row))[:len(row)]


def test_buckets_and_sampler():
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(6, 4) == [4, 8] and batch_buckets(1, 2) == [2] and batch_buckets(3, 2) == [2, 4]
    logits = torch.tensor([[0.0, 3.0, 0.1, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # [0.95, 0.03, 0.02]: the nucleus of 0.9 is the first token alone
    dominant = torch.log(torch.tensor([[0.95, 0.03, 0.02]])).expand(200, 3)
    assert set(sample_tokens(dominant, "top_p", top_p=0.9, generator=g).tolist()) == {0}
    flat = torch.zeros(400, 4)
    draws = sample_tokens(flat, "top_p", top_p=1.0, generator=g)
    assert set(draws.tolist()) == {0, 1, 2, 3} and max(torch.bincount(draws).tolist()) < 160
    two = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(300, 3)  # the nucleus of 0.7: tokens 0 and 1
    assert set(sample_tokens(two, "top_p", top_p=0.7, generator=g).tolist()) == {0, 1}
    cold = sample_tokens(torch.log(torch.tensor([[0.4, 0.35, 0.25]])).expand(100, 3), "top_p", top_p=1.0,
                         temperature=torch.tensor(0.01), generator=g)
    assert set(cold.tolist()) == {0}
    a = sample_tokens(flat, "top_p", top_p=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_tokens(flat, "top_p", top_p=1.0, generator=torch.Generator().manual_seed(5)))


def test_bad_input():
    engine = Engine(_model(), max_batch=2, max_len=8)
    with pytest.raises(ValueError, match="batch of 3 sequences is larger than max_batch 2"):
        engine.generate(_prompts(3), 2)
    with pytest.raises(ValueError, match="prompt of 9 tokens is longer than max_len 8"):
        engine.prefill(_prompts(1, 9))
    with pytest.raises(ValueError, match="need 9 cached tokens, more than max_len 8"):
        engine.generate(_prompts(1, 6), 4)
    with pytest.raises(ValueError, match="decode_step: no sequences yet"):
        engine.decode_step(torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="sampling must be one of"):
        engine.generate(_prompts(1), 2, sampling="beam")
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.generate(_prompts(1), 2, sampling="top_p", top_p=0.0)
    with pytest.raises(ValueError, match="integer token ids"):
        engine.generate(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        engine.generate(torch.full((1, 4), 96), 2)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        Engine(_model(), max_batch=0, max_len=8)
    engine.prefill(_prompts(2, 8))
    with pytest.raises(ValueError, match="the KV caches are full"):
        engine.decode_step(torch.zeros(2, dtype=torch.int64))


def _modes(batch, modes, gen_len=GEN):
    """Greedy tokens of every mode on this rank."""
    w = this_world()
    out = {mode: Engine(_model(mode, device=w.device), max_batch=batch, max_len=P + gen_len).generate(
        _prompts(batch), gen_len).tokens for mode in modes}
    release_contexts()  # the session's world is shared with other tests: leave its heap empty
    return out


def test_modes_agree_one_rank(world1):
    got = world1.run(_modes, 2, MODES)[0]
    assert all(torch.equal(got[m], got["torch"]) for m in MODES), got


def test_modes_agree_two_ranks_ag_rs_padded(world2):
    """Batch 1 of a 5-token prompt: ag_rs pads the prefill and the decode step to 2 sequences."""
    ranks = world2.run(_modes, 1, MODES, 2)
    for got in ranks:
        assert all(torch.equal(got[m], got["torch"]) for m in MODES), got
    assert all(torch.equal(ranks[1][k], ranks[0][k]) for k in ranks[0])


def _top_p():
    engine = Engine(_model(device=this_world().device), max_batch=2, max_len=P + 6)
    ids = _prompts(2)
    run = [engine.generate(ids, 6, sampling="top_p", top_p=0.9, temperature=0.8, seed=s).tokens for s in (5, 5, 6)]
    greedy = engine.generate(ids, 6).tokens
    release_contexts()
    return run, greedy


def test_top_p_is_deterministic_and_the_same_on_every_rank(world2):
    ranks = world2.run(_top_p)
    (a, b, c), greedy = ranks[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, greedy)
    assert all(torch.equal(x, y) for x, y in zip(ranks[1][0], ranks[0][0]))


def _cpu_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _tiny_checkpoint(path: Path):
    """A checkpoint directory of the tiny model with a word-level tokenizer of its 96 ids (``w0`` .. ``w95``)."""
    tokenizers = pytest.importorskip("tokenizers")
    from triton_dist.layers import named_tensor_shards
    model = _model()
    loader.save_checkpoint({n: ts.target for n, ts in named_tensor_shards(model)}, str(path), CFG.to_hf())
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


@cpu_world_only
def test_cli_generate_prints_the_table(tmp_path):
    """From a checkpoint directory with a tokenizer, its first decoder layer only (--layers 1), paged KV cache."""
    _tiny_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "generate", "--tp", "2", "--world", "cpu",
                          "--model", str(tmp_path), "--mode", "torch,gemm_ar", "--batch", "2", "--prompt",
                          "w5 w17 w3 w40 w8", "--gen-len", str(GEN), "--page-size", "4", "--layers", "1"],
                         cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("generate: ") and "(1 layers, checkpoint), tp 2, batch 2, prompt 5, gen 3" in line
               for line in lines), lines
    assert any(line.startswith("mode") and "tokens/s" in line and "same tokens as torch" in line for line in lines)
    torch_row = next(line for line in lines if line.startswith("torch "))
    assert next(line for line in lines if line.startswith("gemm_ar ")).endswith(" yes") and torch_row.endswith(" -")
    one = build_model(dataclasses.replace(CFG, num_hidden_layers=1), dtype=torch.float32)
    want, _ = _manual(loader.load_checkpoint(one, str(tmp_path)), torch.tensor([[5, 17, 3, 40, 8]]), GEN)
    text = " ".join(f"w{t}" for t in want[0].tolist())
    assert f"torch: 'w5 w17 w3 w40 w8' -> '{text}'" in out.stdout, out.stdout


def test_cli_generate_usage_errors():
    from triton_dist import cli
    opts, extra = cli.build_parser().parse_known_args(["generate", "--tp", "2", "--world", "cpu", "--model", "tiny",
                                                       "--mode", "torch,ag_rs", "--batch", "4"])
    assert (opts.command, opts.nprocs, opts.mode) == ("generate", 2, "cpu") and "e2e" in cli.BENCHES
    assert extra == ["--model", "tiny", "--mode", "torch,ag_rs", "--batch", "4"]
    out = subprocess.run([sys.executable, "-m", "triton_dist.models.generate", "--model", "tiny", "--mode", "cpu"],
                         cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "the world is --world cpu|gpu" in out.stderr, out.stderr


@cpu_world_only
def test_bench_e2e_smoke_writes_rows(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", "2", "--mode", "cpu", "e2e", "--",
                          "--smoke", "--out", str(tmp_path), "--modes", "allreduce", "--layers", "1"],
                         cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in e2e.OPS
                                                        for p in ("torch_graph", "triton_dist:allreduce")}
    assert all(r["shape"] == "model=tiny/1l,batch=1,context=5,tp=2" and r["world_size"] == 2 for r in rows)
    assert len({r["run_id"] for r in rows}) == 1 and len(rows) == 4
    assert "e2e_decode: ours / torch_graph time (goal <= 1)" in out.stdout
    assert "greedy tokens differ" not in out.stdout + out.stderr
    e2e.main(["--render", str(tmp_path / "cpu.jsonl"), "--no-plot"])
    shown = capsys.readouterr().out
    assert "model=tiny/1l,batch=1,context=5,tp=2 [allreduce]" in shown and "tok/s" in shown
    assert e2e.parse_shape(e2e.shape("qwen3-8b", 8, 512, 4)) == {"model": "qwen3-8b", "batch": "8", "context": "512",
                                                                "tp": "4"}
