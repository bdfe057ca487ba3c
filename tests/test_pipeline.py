"""Pipeline parallelism: point-to-point send / recv (``triton_dist.kernels.p2p``) bit-exact on random data of odd
sizes and dtypes, both directions, back-to-back calls through both parity slots (sends running two calls ahead of
their recvs), against torch.distributed too; bad input; a receiver that expects another size or a send that never
comes, named; on GPUs, CUDA-graph replay and a stress of back-to-back calls. A 2-stage split of a tiny random Qwen3
(prefill, then greedy decode steps whose tokens go back from the last stage to the first) against the unsplit model
on one rank, in the modes torch (torch.distributed transport) and allreduce (our kernels), untied and tied
embeddings; the stage's argument checks."""
import dataclasses
import time

import pytest
import torch

import triton_dist
from triton_dist.kernels import p2p
from triton_dist.layers import Parallel, Step, materialize, parallelize, release_contexts
from triton_dist.models import loader
from triton_dist.models.config import ModelConfig
from triton_dist.models.pipeline import PipelineStage, build_stage, stage_layers
from triton_dist.models.qwen3 import CausalLM

from _util import poison, rand, sync, this_world

# (shape, dtype) of consecutive calls: odd sizes, several tiles (1024 words per tile here, 2 programs), 16-bit and
# 8-bit words, a single element, nothing
CALLS = [((1151,), torch.float32), ((5, 123), torch.float16), ((3,), torch.float32), ((2, 1033), torch.float32),
         ((7,), torch.uint8), ((1,), torch.float32), ((0,), torch.float32), ((2049,), torch.bfloat16)]
MAX_NUMEL = 2066


def _exchange(seed):
    """Every call both ways at once (each rank sends, then receives), then bursts of three sends from one rank before
    the other receives (the third waits for the first recv), each direction; exact against the sender's data."""
    w = this_world()
    peer = 1 - w.rank
    ctxs = {d: p2p.P2PContext(MAX_NUMEL, d, num_programs=2) for d in (torch.float32, torch.float16, torch.uint8,
                                                                      torch.bfloat16)}
    ok = []
    for i, (shape, dtype) in enumerate(CALLS):
        x = rand(shape, dtype, seed + 100 * i + w.rank, w.device)
        ctxs[dtype].send(x, peer)
        if i % 2:
            got = ctxs[dtype].recv(peer, out=poison(torch.empty(shape, dtype=dtype, device=w.device)))
        else:
            got = ctxs[dtype].recv(peer, shape=shape)
        sync()
        ok.append(tuple(got.shape) == shape and got.dtype == dtype
                  and torch.equal(got, rand(shape, dtype, seed + 100 * i + peer, w.device)))
    ctx = ctxs[torch.float32]
    for sender in (0, 1):
        sizes = [(1151,), (17,), (1151,)]
        xs = [rand(s, torch.float32, seed + 7 * j + 50 * sender, w.device) for j, s in enumerate(sizes)]
        if w.rank == sender:
            for x in xs:
                ctx.send(x, peer)
        else:
            time.sleep(0.3)  # the sender runs ahead as far as the protocol lets it: two sends, the third waits
            ok += [torch.equal(ctx.recv(peer, shape=x.shape), x) for x in xs]
    # the torch reference moves the same data
    x = rand((5, 123), torch.float32, seed + 999, w.device)
    if w.rank == 0:
        ctx.send(x, 1)
        p2p.send_reference(x, 1)
    else:
        got, ref = ctx.recv(0, shape=x.shape), p2p.recv_reference(0, shape=x.shape, dtype=x.dtype)
        ok.append(torch.equal(got, ref) and torch.equal(got, x))
    sync()
    for c in ctxs.values():
        c.close()
    return ok


def test_send_recv_exact(world2, seed):
    for ok in world2.run(_exchange, seed):
        assert all(ok), ok


def _bad_inputs():
    w = this_world()
    ctx = p2p.P2PContext(64, torch.float32)
    peer = 1 - w.rank
    x = torch.ones(8, device=w.device)
    calls = {
        "too_large": lambda: ctx.send(torch.ones(65, device=w.device), peer),
        "recv_too_large": lambda: ctx.recv(peer, shape=(5, 13)),
        "dtype": lambda: ctx.send(x.half(), peer),
        "recv_dtype": lambda: ctx.recv(peer, out=torch.empty(8, dtype=torch.float16, device=w.device)),
        "self": lambda: ctx.send(x, w.rank),
        "recv_self": lambda: ctx.recv(w.rank, shape=(8,)),
        "no_rank": lambda: ctx.send(x, 2),
        "no_shape": lambda: ctx.recv(peer),
        "strided": lambda: ctx.send(torch.ones(8, 2, device=w.device)[:, 0], peer),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = str(e)
    ctx.close()
    try:
        ctx.send(x, peer)
    except RuntimeError as e:
        out["closed"] = str(e)
    return out


def test_bad_inputs(world2):
    for got in world2.run(_bad_inputs):
        assert "up to 64 elements of torch.float32, got 65" in got["too_large"]
        assert "got 65 of torch.float32" in got["recv_too_large"]
        assert "got 8 of torch.float16" in got["dtype"] and "got 8 of torch.float16" in got["recv_dtype"]
        assert "cannot send to itself" in got["self"] and "is this rank" in got["recv_self"]
        assert "dst = 2 is not a rank of this world of 2" in got["no_rank"]
        assert "give the shape" in got["no_shape"]
        assert "contiguous" in got["strided"]
        assert "closed" in got["closed"]


def _mismatch_then_missing():
    """Rank 0 sends 40 elements where rank 1 expects 44: rank 1 stops with CallMismatch naming both calls. Then, on a
    fresh context, rank 1 receives what rank 0 never sends: a timeout naming the flag, the peer and the rule."""
    w = this_world()
    ctx = p2p.P2PContext(64, torch.float32, num_programs=1)
    out = []
    try:
        if w.rank == 0:
            ctx.send(torch.ones(40), 1)
        else:
            ctx.recv(0, shape=(44,))
        sync()
        out.append(None)
    except (triton_dist.CallMismatch, triton_dist.SignalTimeout) as err:
        out.append((type(err).__name__, str(err)))
    fresh = p2p.P2PContext(64, torch.float32, num_programs=1)
    if w.rank == 1:
        try:
            fresh.recv(0, shape=(8,))
            out.append(None)
        except (triton_dist.CallMismatch, triton_dist.SignalTimeout) as err:
            out.append((type(err).__name__, str(err)))
    return out


def test_mismatch_and_missing_send_are_named():
    from conftest import BACKEND, new_world
    if BACKEND != "cpu":
        pytest.skip("a GPU trap ends the process's CUDA context; the GPU watchdog uses the same labels")
    with new_world(2, env={"TRITON_DIST_WAIT_TIMEOUT_S": "2"}) as w:
        sent, received = w.run(_mismatch_then_missing, timeout=120)
    assert sent == [None], sent
    kind, msg = received[0]
    assert kind == "CallMismatch" and "p2p(method=nvlink, float32, 44 elements)" in msg, received
    assert "but rank 0's call has" in msg, received  # another signature (its name is known on rank 0 only)
    kind, msg = received[1]
    assert kind == "SignalTimeout", received
    assert "p2p's flag (parity 1) of sends from rank 0" in msg and "has not sent call 1 to this rank" in msg, msg
    assert "needs a matching recv(src) on dst" in msg, msg


def _graph_ping_pong(seed):
    """Rank 0 sends x to rank 1, which sends -x back: captured once in a CUDA graph on both ranks (after a warm-up
    call) and replayed on new data; then many back-to-back eager calls both ways at once with no host sync between
    them, their sum checked at the end."""
    w = this_world()
    peer = 1 - w.rank
    ctx = p2p.P2PContext(8 * 4096, torch.bfloat16)
    x = torch.empty((8, 4096), dtype=torch.bfloat16, device=w.device)
    back = torch.empty_like(x)

    def step():
        if w.rank == 0:
            ctx.send(x, 1)
            ctx.recv(1, out=back)
        else:
            ctx.send(torch.neg(ctx.recv(0, shape=x.shape)), 0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.copy_(rand(x.shape, x.dtype, seed, w.device))
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ok = True
    for replay in range(8):
        x.copy_(rand(x.shape, x.dtype, seed + replay + 1, w.device))
        back.fill_(float("nan"))
        graph.replay()
        sync()
        ok &= w.rank == 1 or torch.equal(back, torch.neg(x))
    ints = p2p.P2PContext(1199, torch.int32)
    data = [rand((1151 + 16 * j,), torch.int32, seed + 10 * j + w.rank, w.device) for j in range(4)]
    acc = torch.zeros(1199, dtype=torch.int64, device=w.device)
    for i in range(2000):
        j = i % 4
        ints.send(data[j], peer)
        acc[:data[j].numel()] += ints.recv(peer, shape=data[j].shape)
    want = torch.zeros_like(acc)
    for j in range(4):
        want[:1151 + 16 * j] += 500 * rand((1151 + 16 * j,), torch.int32, seed + 10 * j + peer, w.device)
    sync()
    ok &= torch.equal(acc, want)
    ints.close()
    ctx.close()
    return bool(ok)


@pytest.mark.gpu
def test_graph_replay_and_stress(world2, seed):
    assert all(world2.run(_graph_ping_pong, seed, timeout=300))


def test_stage_layers():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(3, 2, (1, 2)) == [range(0, 1), range(1, 3)]
    with pytest.raises(ValueError, match="summing to the model's 3 layers"):
        stage_layers(3, 2, (1, 1))


# ---------------------------------------------------------------------------------------------- the split model
CFG = ModelConfig(kind="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
B, PROMPT, DECODE, MAX_LEN = 2, 5, 3, 16


def _steps(dev):
    """``(positions, kv_lens)`` of the prefill, then of each decode step."""
    yield (torch.arange(PROMPT, device=dev)[None].expand(B, PROMPT),
           torch.full((B,), PROMPT, dtype=torch.int32, device=dev))
    for t in range(PROMPT, PROMPT + DECODE):
        yield torch.full((B, 1), t, device=dev), torch.full((B,), t + 1, dtype=torch.int32, device=dev)


def _generate(forward, first_tokens, dev):
    """Prefill the prompt and decode greedily; ``forward(ids, step) -> (logits or None, next tokens or None)``.
    Returns the logits of every step (the prefill's for every prompt token) where they exist."""
    ids, logits = first_tokens, []
    for i, (pos, lens) in enumerate(_steps(dev)):
        step = Step(B, pos.shape[1], pos, lens)
        out, nxt = forward(ids, step, i == 0)
        if out is not None:
            logits.append(out if i == 0 else out[:, None])
        ids = None if nxt is None else nxt[:, None]
    return torch.cat(logits, 1) if logits else None


def _pipeline_vs_unsplit(mode, layers, tied, seed):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    w = this_world()
    dev = w.device
    prompt = torch.randint(0, cfg.vocab_size, (B, PROMPT), generator=torch.Generator().manual_seed(seed)).to(dev)
    stage = build_stage(cfg, mode=mode, dtype=torch.float32, max_tokens=B * PROMPT, max_batch=B, layers=layers)
    loader.init_random(stage, seed)
    caches = stage.new_caches(B, MAX_LEN)

    def stage_forward(ids, step, prefill):
        logits = stage(ids if stage.first else None, step, caches, all_logits=prefill)
        nxt = (logits[:, -1] if prefill else logits).argmax(-1) if stage.last else None
        return logits, stage.tokens_to_first(nxt, B)

    with torch.no_grad():
        got = _generate(stage_forward, prompt if stage.first else None, dev)
    sync()
    stage.close()
    release_contexts()  # the ops the stages' layers used: the session's world is shared with other tests
    names = [n for n, _ in stage.named_parameters()]
    held = (sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}),
            "model.embed_tokens.weight" in names, "lm_head.weight" in names, "model.norm.weight" in names)
    if not stage.last:
        return held, None
    ref_model = CausalLM(cfg, torch.float32)
    parallelize(ref_model, mode, par=Parallel(mode))
    materialize(ref_model, dev, torch.float32)
    loader.init_random(ref_model, seed)
    ref_caches = ref_model.new_caches(B, MAX_LEN)

    def ref_forward(ids, step, prefill):
        logits = ref_model(ids, step, ref_caches, all_logits=prefill)
        return logits, (logits[:, -1] if prefill else logits).argmax(-1)

    with torch.no_grad():
        ref = _generate(ref_forward, prompt, dev)
    return held, (torch.allclose(got, ref, atol=1e-5, rtol=1e-5), float((got - ref).abs().max()), tuple(got.shape))


def _stage_errors():
    w = this_world()
    out = {}

    def meta_model(par):
        lm = CausalLM(CFG, torch.float32)
        return parallelize(lm, "torch", par=par)

    calls = {
        "tp": lambda: PipelineStage(meta_model(Parallel.current("torch")), max_tokens=8),
        "rank": lambda: PipelineStage(meta_model(Parallel("torch")), 1 - w.rank, max_tokens=8),
        "stages": lambda: PipelineStage(meta_model(Parallel("torch")), num_stages=3, max_tokens=8),
        "layers": lambda: PipelineStage(meta_model(Parallel("torch")), max_tokens=8, layers=(1, 1)),
        "max_tokens": lambda: PipelineStage(meta_model(Parallel("torch")), max_tokens=0),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = str(e)
    stage = build_stage(CFG, dtype=torch.float32, max_tokens=4)  # torch mode: no context to close
    step = Step(1, 5, torch.arange(5)[None], torch.full((1,), 5, dtype=torch.int32))
    try:
        stage(torch.zeros((1, 5), dtype=torch.int64), step, stage.new_caches(1, 8))
    except ValueError as e:
        out["too_many_tokens"] = str(e)
    try:
        stage(None, step, [])
    except ValueError as e:
        out["caches"] = str(e)
    return out


def test_stage_errors(world2):
    for got in world2.run(_stage_errors):
        assert "split over 2 ranks by tensor parallelism" in got["tp"], got
        assert "runs on rank" in got["rank"] and "num_stages must be the world size 2" in got["stages"], got
        assert "summing to the model's 3 layers" in got["layers"] and "max_tokens must be" in got["max_tokens"], got
        assert "5 tokens, the stage was built for max_tokens = 4" in got["too_many_tokens"], got
        assert "got 0 caches" in got["caches"], got


@pytest.mark.parametrize("mode,layers,tied", [("torch", None, False), ("allreduce", (1, 2), True)])
def test_two_stages_match_the_unsplit_model(world2, mode, layers, tied, seed):
    (held0, none), (held1, (ok, err, shape)) = world2.run(_pipeline_vs_unsplit, mode, layers, tied, seed)
    split = stage_layers(CFG.num_hidden_layers, 2, layers)
    # stage 0: its layers and the embedding; stage 1: its layers, the norm and the head (tied: the embedding as the
    # head's weight)
    assert held0 == (list(split[0]), True, False, False) and none is None, held0
    assert held1 == (list(split[1]), tied, not tied, True), held1
    assert shape == (B, PROMPT + DECODE, CFG.vocab_size)
    assert ok, err
