"""GPU-only tests of the overlapped GEMMs: bf16 at moderate and odd shapes, every method, 50 back-to-back calls with
random M on one context, and every op captured once in a CUDA graph and replayed on new data. Deselected by
default; `bash scripts/gpu_suite.sh` runs them (on 2 and 4 GPUs)."""
import hashlib

import pytest
import torch

import triton_dist
from triton_dist import ops
from triton_dist.kernels import ag_gemm as agm
from triton_dist.kernels import gemm_ar as gar
from triton_dist.kernels import gemm_rs as grs

from _util import rand, sync, this_world
from test_gemm_ops import LAYOUTS, check_gemm, make_b

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
# (rows of C per rank at most, K, N): TMA-friendly, and odd (K = 1002: rows of 2004 bytes, pointer path for A)
SHAPES = {"moderate": (256, 1024, 768), "odd": (131, 1002, 517)}
CALLS = 50


def _random_rows(g, most):
    return int(torch.randint(1, most + 1, (1,), generator=g))


def _ag_gemm_random(method, shape, seed, config=None):
    """50 calls with random rows per rank; every 5th call a multiple of 128 rows, whose chunks are whole row tiles of
    the GPU configs, so the GEMM stores its tiles by TMA (gemm.store_c) there."""
    w = this_world()
    m_most, k, n = SHAPES[shape]
    ctx = agm.AGGemmContext(w.world_size * m_most, k, n, BF16, config=config)
    g = torch.Generator().manual_seed(seed)  # the same sizes on every rank
    for call in range(CALLS):
        m_loc = _random_rows(g, m_most)
        if call % 5 == 4 and m_most >= 128:
            m_loc = 128 * (1 + (call // 5) % (m_most // 128))
        s = seed + 1000 * call
        shards = [rand((m_loc, k), BF16, s + r, w.device) for r in range(w.world_size)]
        b = make_b(k, n, BF16, s + 100 + w.rank, LAYOUTS[call % 3], w.device)
        got, gathered = agm.ag_gemm(shards[w.rank], b, ctx=ctx, method=method, return_gathered=True)
        full = torch.cat(shards)
        assert torch.equal(gathered, full), f"call {call}: gathered A differs"
        check_gemm(got, full.double() @ b.double(), agm.ag_gemm_reference(shards[w.rank], b), BF16,
                   f"ag_gemm {method} call {call} (m_loc {m_loc})")
    ctx.close()
    return True


def _all_partials(m, k, n, seed, layout):
    w = this_world()
    a_all = [rand((m, k), BF16, seed + r, w.device) for r in range(w.world_size)]
    b_all = [make_b(k, n, BF16, seed + 100 + r, layout, w.device) for r in range(w.world_size)]
    exact = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
    return a_all[w.rank], b_all[w.rank], exact


def _gemm_rs_random(method, shape, seed):
    w = this_world()
    m_most, k, n = SHAPES[shape]
    ctx = grs.GemmRSContext(w.world_size * m_most, k, n, BF16)
    g = torch.Generator().manual_seed(seed)
    for call in range(CALLS):
        m_loc = _random_rows(g, m_most)
        a, b, exact = _all_partials(w.world_size * m_loc, k, n, seed + 1000 * call, LAYOUTS[call % 3])
        got = grs.gemm_rs(a, b, ctx=ctx, method=method)
        check_gemm(got, exact[w.rank * m_loc:(w.rank + 1) * m_loc], grs.gemm_rs_reference(a, b), BF16,
                   f"gemm_rs {method} call {call} (m_loc {m_loc})")
    ctx.close()
    return True


def _gemm_ar_random(method, shape, seed):
    _, k, n = SHAPES[shape]
    ctx = gar.GemmARContext(256, k, n, BF16)
    g = torch.Generator().manual_seed(seed)
    digests = []
    for call in range(CALLS):
        m = _random_rows(g, 256)
        a, b, exact = _all_partials(m, k, n, seed + 1000 * call, LAYOUTS[call % 3])
        got = gar.gemm_ar(a, b, ctx=ctx, method=method)
        check_gemm(got, exact, gar.gemm_ar_reference(a, b), BF16, f"gemm_ar {method} call {call} (m {m})")
        digests.append(hashlib.sha1(got.cpu().view(torch.uint8).numpy().tobytes()).hexdigest())
    ctx.close()
    return digests


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", agm.METHODS)
def test_ag_gemm_bf16(world, method, shape, seed):
    assert all(world.run(_ag_gemm_random, method, shape, seed, timeout=900))


@pytest.mark.parametrize("method", ["copy_engine", "sm"])
def test_ag_gemm_bf16_narrow_tiles(world, method, seed):
    """The narrow dense config (128 x 128 tiles, 4 warps, whole-tile TMA stores), which the ops pick for shapes that
    256-wide tiles fill badly (gemm.default_config)."""
    from triton_dist.kernels.gemm import GPU_CONFIG_16BIT_NARROW
    assert all(world.run(_ag_gemm_random, method, "moderate", seed, GPU_CONFIG_16BIT_NARROW, timeout=900))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", grs.METHODS)
def test_gemm_rs_bf16(world, method, shape, seed):
    assert all(world.run(_gemm_rs_random, method, shape, seed, timeout=900))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", gar.METHODS)
def test_gemm_ar_bf16(world, method, shape, seed):
    results = world.run(_gemm_ar_random, method, shape, seed, timeout=900)
    assert all(r == results[0] for r in results), "every rank must get bit-identical results"


def _graph_replay(seed):
    """Every op and method captured once in a CUDA graph (after warm-up calls made the contexts and compiled the
    kernels) and replayed three times on new data."""
    w = this_world()
    m_loc, k, n, m_ar = 128, 512, 384, 16
    dev = w.device
    a_ag, b_ag = torch.empty((m_loc, k), dtype=BF16, device=dev), torch.empty((n, k), dtype=BF16, device=dev).t()
    a_rs, b_rs = torch.empty((w.world_size * m_loc, k), dtype=BF16, device=dev), torch.empty((k, n), dtype=BF16,
                                                                                           device=dev)
    a_ar, b_ar = torch.empty((m_ar, k), dtype=BF16, device=dev), torch.empty((k, n), dtype=BF16, device=dev)
    outs = {}
    calls = {}
    for method in agm.METHODS:
        outs["ag", method] = torch.empty((w.world_size * m_loc, n), dtype=BF16, device=dev)
        calls["ag", method] = lambda m=method: ops.ag_gemm(a_ag, b_ag, method=m, out=outs["ag", m])
    for method in grs.METHODS:
        outs["rs", method] = torch.empty((m_loc, n), dtype=BF16, device=dev)
        calls["rs", method] = lambda m=method: ops.gemm_rs(a_rs, b_rs, method=m, out=outs["rs", m])
    for method in gar.METHODS:
        outs["ar", method] = torch.empty((m_ar, n), dtype=BF16, device=dev)
        calls["ar", method] = lambda m=method: ops.gemm_ar(a_ar, b_ar, method=m, out=outs["ar", m])

    def fill(s):
        """New inputs; returns the fp64 results and torch's bf16 results every op must match."""
        shards = [rand((m_loc, k), BF16, s + r, dev) for r in range(w.world_size)]
        a_ag.copy_(shards[w.rank])
        b_ag.copy_(rand((k, n), BF16, s + 50 + w.rank, dev))
        full = torch.cat(shards)
        want = {"ag": (full.double() @ b_ag.double(), agm.ag_gemm_reference(a_ag, b_ag))}
        a, b, exact = _all_partials(w.world_size * m_loc, k, n, s + 7, "row")
        a_rs.copy_(a)
        b_rs.copy_(b)
        want["rs"] = (exact[w.rank * m_loc:(w.rank + 1) * m_loc], grs.gemm_rs_reference(a_rs, b_rs))
        a, b, exact = _all_partials(m_ar, k, n, s + 9, "row")
        a_ar.copy_(a)
        b_ar.copy_(b)
        want["ar"] = (exact, gar.gemm_ar_reference(a_ar, b_ar))
        return want

    fill(seed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls.values():  # warm-up: contexts are made and kernels compiled outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls.values():
            call()
    for replay in range(3):
        want = fill(seed + 100 * (replay + 1))
        triton_dist.barrier()
        graph.replay()
        sync()
        for (op, method), out in outs.items():
            check_gemm(out, *want[op], BF16, f"{op} {method}, replay {replay}")
    ops.release_contexts()
    return True


def test_gemm_ops_replay_in_cuda_graph(world, seed):
    assert all(world.run(_graph_replay, seed, timeout=900))
