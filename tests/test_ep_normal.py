"""Expert-parallel normal (prefill) dispatch / combine (``triton_dist.moe.EPNormalContext``): the packed received
rows, offsets and return addresses bit-exact against a torch computation over every rank's tokens, the combine exact
against a torch loop in the same order; uneven token counts, -1 slots, an expert with no token, back-to-back calls,
the capacity check."""
import pytest
import torch

from triton_dist import moe

from _util import poison, rand, this_world
from test_ep_low_latency import _expert_fn, _make, _routing


def _round_trip(tokens_per_rank, hidden, topk, experts, max_tokens, dtype, seed, calls, max_recv_rows):
    w = this_world()
    ctx = moe.EPNormalContext(max_tokens, hidden, topk, experts, dtype, max_recv_rows=max_recv_rows)
    L = ctx.local_experts
    ok = True
    for call in range(calls):
        tokens = tokens_per_rank[(w.rank + call) % len(tokens_per_rank)]
        s = seed + 1000 * call
        x = rand((tokens, hidden), dtype, s + w.rank, w.device)
        ids = _routing(tokens, topk, experts, s, w.rank).to(w.device)
        weights = rand((tokens, topk), torch.float32, s + 50 + w.rank, w.device)
        recv, offsets, handle, counts = ctx.dispatch(x, ids, return_counts=True)
        rows, _, want_count, want_rank, want_slot = moe.dispatch_reference(ctx, x, ids)
        ok &= counts == want_count.tolist()
        ok &= offsets.tolist() == [0] + torch.cumsum(want_count, 0).tolist()
        y = poison(torch.empty((ctx.max_recv_rows, hidden), dtype=dtype, device=w.device))
        for le in range(L):
            a, b = int(offsets[le]), int(offsets[le + 1])
            ok &= torch.equal(recv[a:b], rows[le])
            ok &= torch.equal(handle.src_rank[a:b], want_rank[le]) and torch.equal(handle.src_slot[a:b], want_slot[le])
            y[a:b] = _expert_fn(recv[a:b], w.rank * L + le)
        out = ctx.combine(y, ids, weights, handle)
        pair_y = torch.zeros((tokens, topk, hidden), dtype=dtype, device=w.device)
        for t in range(tokens):
            for j in range(topk):
                if int(ids[t, j]) >= 0:
                    pair_y[t, j] = _expert_fn(x[t:t + 1], int(ids[t, j]))[0]
        ok &= torch.equal(out, moe.combine_reference(pair_y, ids, weights, dtype))
    ok &= ctx.dropped_pairs() == 0
    ctx.close()
    return bool(ok)


def test_dispatch_combine_round_trip(world, seed):
    w = world.world_size
    assert all(world.run(_round_trip, [9, 0, 5, 7], 96, 3, 2 * w, 10, torch.bfloat16, seed, 3, None))


def test_odd_world_fp32(world3, seed):
    assert all(world3.run(_round_trip, [6, 2, 4], 40, 2, 6, 6, torch.float32, seed, 2, 6 * 2 * 3))


def _overflow(seed):
    """Every token of every rank to expert 0 (rank 0): more rows than rank 0 holds; rank 0's host check raises and
    the senders count what they dropped; the other ranks receive nothing."""
    w = this_world()
    ctx = moe.EPNormalContext(6, 32, 1, 2 * w.world_size, torch.float32, max_recv_rows=4)
    x = rand((6, 32), torch.float32, seed + w.rank, w.device)
    ids = torch.zeros((6, 1), dtype=torch.int32, device=w.device)
    msg = "no error"
    try:
        ctx.dispatch(x, ids, return_counts=True)
    except ValueError as e:
        msg = str(e)
    dropped = ctx.dropped_pairs()
    ctx.close()
    return msg, dropped


def test_capacity(world2, seed):
    (m0, d0), (m1, d1) = world2.run(_overflow, seed)
    assert "max_recv_rows = 4" in m0 and m1 == "no error"
    assert d0 + d1 == 12 - 4  # 12 pairs for 4 rows: rank 0's own pairs land first (it is source 0)
    assert d0 == 2 and d1 == 6


def test_context_arguments(world2):
    base = dict(max_tokens=4, hidden=64, topk=2, num_experts=4)
    for kw, needle in ((dict(base, max_recv_rows=0), "max_recv_rows must be an int >= 1"),
                       (dict(base, num_experts=3), "multiple of the world size")):
        assert all(needle in m and not m.startswith("leaked") for m in world2.run(_make, kw, "EPNormalContext"))
    assert all(m == "no error" for m in world2.run(_make, dict(base, max_recv_rows=10 ** 6), "EPNormalContext"))


@pytest.mark.gpu
def test_bf16_on_gpu(world, seed):
    w = world.world_size
    assert all(world.run(_round_trip, [256, 100, 0, 177], 512, 8, 8 * w, 256, torch.bfloat16, seed, 2, None))
