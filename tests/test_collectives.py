"""AllReduce, AllGather, ReduceScatter against their torch.distributed references (CPU world; GPUs in the suite)."""
import os

import pytest
import torch

import triton_dist
from triton_dist import ops
from triton_dist.kernels import all_gather as ag
from triton_dist.kernels import all_reduce as ar
from triton_dist.kernels import all_to_all as a2a
from triton_dist.kernels import reduce_scatter as rs
from triton_dist.kernels._ll import LL_MAX_BYTES

from _util import poison, rand, sync, this_world

FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # bf16 in the CPU world too (language/_interp_mend.py)


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]


def _all_reduce(shape, dtype, method, seed, calls):
    w = this_world()
    ctx = ar.AllReduceContext(w.world_size * torch.Size(shape).numel(), dtype, num_programs=2)
    for call in range(calls):  # back-to-back calls on one context exercise the epoch protocol
        x = rand(shape, dtype, seed + 1000 * call + w.rank, w.device)
        out = poison(torch.empty_like(x))
        ar.all_reduce(x, ctx=ctx, method=method, out=out)
        sync()
        ref = ar.all_reduce_reference(x)
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    ctx.close()
    return out.sum().item()


@pytest.mark.parametrize("method", ["one_shot", "two_shot", "push_one_shot", "ll", "push_two_shot"])
@pytest.mark.parametrize("shape,dtype", [((1151,), torch.float32), ((5, 123), torch.float16), ((3,), torch.float32)])
def test_all_reduce(world, method, shape, dtype, seed):
    sums = world.run(_all_reduce, shape, dtype, method, seed, 3)
    assert len(set(sums)) == 1, "every rank must get bit-identical sums"


def test_all_reduce_odd_world(world3, seed):
    for method in ("one_shot", "two_shot", "push_one_shot", "ll", "push_two_shot"):
        world3.run(_all_reduce, (1001,), torch.float32, method, seed, 2)


def _all_gather(shape, dtype, method, seed, calls):
    w = this_world()
    ctx = ag.AllGatherContext(torch.Size(shape).numel(), dtype, num_programs=2)
    for call in range(calls):
        x = rand(shape, dtype, seed + 1000 * call + w.rank, w.device)
        out = torch.empty((w.world_size * shape[0], *shape[1:]), dtype=dtype, device=w.device)
        out.view(torch.uint8).fill_(0xEE)
        ag.all_gather(x, ctx=ctx, method=method, out=out)
        sync()
        ref = torch.cat([rand(shape, dtype, seed + 1000 * call + r, w.device) for r in range(w.world_size)])
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), f"call {call}: gathered bytes differ"
        if dtype in (torch.float32, torch.int8):
            assert torch.equal(out, ag.all_gather_reference(x))
    ctx.close()
    return True


@pytest.mark.parametrize("method", ["pull", "push", "ring", "copy_engine"])
@pytest.mark.parametrize("shape,dtype", [((37, 51), torch.float32), ((5, 123), torch.float16), ((999,), torch.int8),
                                         ((7, 33), torch.float8_e4m3fn)])
def test_all_gather_exact(world, method, shape, dtype, seed):
    assert all(world.run(_all_gather, shape, dtype, method, seed, 3))


@pytest.mark.parametrize("shape,dtype", [((37, 51), torch.float32), ((6, 123), torch.float16), ((1000,), torch.int8)])
def test_all_gather_ll(world, shape, dtype, seed):
    """The LL method (whole 32-bit words per rank), bytes exact, back-to-back calls reuse both buffer parities."""
    assert all(world.run(_all_gather, shape, dtype, "ll", seed, 3))


def test_all_gather_odd_world(world3, seed):
    for method in ("pull", "push", "ring", "ll", "copy_engine"):
        assert all(world3.run(_all_gather, (11, 13), torch.float32, method, seed, 2))


def _reduce_scatter(rows, cols, dtype, seed, calls, method="full_mesh"):
    w = this_world()
    ctx = rs.ReduceScatterContext(w.world_size * rows * cols, dtype, num_programs=2)
    for call in range(calls):
        x = rand((w.world_size * rows, cols), dtype, seed + 1000 * call + w.rank, w.device)
        out = poison(torch.empty((rows, cols), dtype=dtype, device=w.device))
        rs.reduce_scatter(x, ctx=ctx, out=out, method=method)
        sync()
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(out, rs.reduce_scatter_reference(x), rtol=rtol, atol=atol)
    ctx.close()
    return True


@pytest.mark.parametrize("method", ["full_mesh", "push", "ring"])
@pytest.mark.parametrize("rows,cols,dtype", [(5, 123, torch.float32), (37, 51, torch.float16), (1, 7, torch.float32)])
def test_reduce_scatter(world, rows, cols, dtype, method, seed):
    assert all(world.run(_reduce_scatter, rows, cols, dtype, seed, 3, method))


def test_reduce_scatter_odd_world(world3, seed):
    for method in ("full_mesh", "push", "ring"):
        assert all(world3.run(_reduce_scatter, 9, 17, torch.float32, seed, 2, method))


def _mixed_methods(seed):
    """Methods with different staging layouts alternate on one context, sizes changing (layout_switch path)."""
    w = this_world()
    ar_ctx = ar.AllReduceContext(w.world_size * 3000, torch.float32, num_programs=2)
    rs_ctx = rs.ReduceScatterContext(w.world_size * 3000, torch.float32, num_programs=2)
    ag_ctx = ag.AllGatherContext(3000, torch.float32, num_programs=2)
    ag_methods = ("copy_engine", "pull", "ll", "push", "copy_engine", "ring", "copy_engine", "ll", "pull", "ll")
    plan = [("push_one_shot", "ring", 2999), ("ll", "push", 1000), ("one_shot", "full_mesh", 1000),
            ("push_one_shot", "ring", 17), ("ll", "ring", 2999), ("ll", "push", 5), ("two_shot", "full_mesh", 2500),
            ("push_two_shot", "ring", 2999), ("two_shot", "ring", 300), ("push_two_shot", "push", 5)]
    for i, (ar_method, rs_method, n) in enumerate(plan):
        x = rand((w.world_size * n,), torch.float32, seed + 10 * i + w.rank, w.device)
        got = ar.all_reduce(x[:n], ctx=ar_ctx, method=ar_method)
        torch.testing.assert_close(got, ar.all_reduce_reference(x[:n]), rtol=1e-5, atol=1e-5)
        got = rs.reduce_scatter(x, ctx=rs_ctx, method=rs_method)
        torch.testing.assert_close(got, rs.reduce_scatter_reference(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(ag.all_gather(x[:n], ctx=ag_ctx, method=ag_methods[i]), ag.all_gather_reference(x[:n]))
    ar_ctx.close()
    rs_ctx.close()
    ag_ctx.close()
    return True


def test_methods_alternate_on_one_context(world, seed):
    assert all(world.run(_mixed_methods, seed))


def _ops_api(seed):
    """The public ops: cached contexts, auto methods, growth to a larger size, every dtype on GPUs."""
    w = this_world()
    results = []
    for dtype in FLOATS:
        for n in (300, 5000):  # the second size grows the cached contexts
            x = rand((n,), dtype, seed + n + w.rank, w.device)
            rtol, atol = _tol(dtype)
            torch.testing.assert_close(ops.all_reduce(x), ar.all_reduce_reference(x), rtol=rtol, atol=atol)
            torch.testing.assert_close(ops.all_reduce(x, method="push_one_shot"), ar.all_reduce_reference(x),
                                       rtol=rtol, atol=atol)
            assert torch.equal(ops.all_gather(x.view(-1, 1)), ag.all_gather_reference(x.view(-1, 1)))
            xs = rand((w.world_size * 7, n // 100), dtype, seed + 7 + w.rank, w.device)
            torch.testing.assert_close(ops.reduce_scatter(xs), rs.reduce_scatter_reference(xs), rtol=rtol, atol=atol)
            results.append(True)
    ops.release_contexts()
    return all(results)


def test_ops_api(world, seed):
    assert all(world.run(_ops_api, seed))


def _bad_inputs():
    w = this_world()
    ctx = ar.AllReduceContext(64, torch.float32, num_programs=2)
    with pytest.raises(ValueError, match="context is for up to 64 elements"):
        ar.all_reduce(torch.ones(65, device=w.device), ctx=ctx)
    with pytest.raises(ValueError, match="method must be"):
        ar.all_reduce(torch.ones(8, device=w.device), ctx=ctx, method="three_shot")
    with pytest.raises(ValueError, match="contiguous"):
        ar.all_reduce(torch.ones(8, 2, device=w.device).t(), ctx=ctx)
    with pytest.raises(TypeError, match="int32 is not supported"):
        ops.all_reduce(torch.ones(8, dtype=torch.int32, device=w.device))
    with pytest.raises(ValueError, match="multiple of the world size"):
        ops.reduce_scatter(torch.ones(w.world_size * 3 + 1, device=w.device))
    with pytest.raises(ValueError, match="0-d tensor"):
        ops.reduce_scatter(torch.tensor(1.0, device=w.device))
    for op in (ops.all_reduce, ops.all_gather, ops.reduce_scatter, ops.all_to_all):
        with pytest.raises(TypeError, match="must be a torch.Tensor.*got list"):
            op([1.0, 2.0])
    with pytest.raises(ValueError, match="method 'll' needs a whole number of 32-bit words"):
        ops.all_gather(torch.ones(3, dtype=torch.float16, device=w.device), method="ll")
    with pytest.raises(ValueError, match="method must be"):
        ops.all_gather(torch.ones(4, device=w.device), method="tree")
    big = ar.AllReduceContext(1 << 20, torch.float32, num_programs=2)
    with pytest.raises(ValueError, match="method 'll' is for messages of at most"):
        ar.all_reduce(torch.ones(1 << 20, device=w.device), ctx=big, method="ll")
    big.close()
    ctx.close()
    ops.release_contexts()
    return True


def test_bad_input(world2):
    assert all(world2.run(_bad_inputs))


def _stress(calls, seed):
    """Back-to-back calls with random sizes and methods, every result checked (GPU only)."""
    w = this_world()
    g = torch.Generator().manual_seed(seed)
    for i in range(calls):
        method = "v"
        try:
            n = int(torch.randint(1, 1 << 16, (1,), generator=g))
            op = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")[i % 4]
            x = torch.randn(w.world_size * n, device=w.device, dtype=torch.bfloat16)
            if op == "all_reduce":
                method = ("one_shot", "two_shot", "push_one_shot", "ll", "push_two_shot")[
                    int(torch.randint(0, 5, (1,), generator=g))]
                if method == "ll" and x.numel() * x.element_size() > LL_MAX_BYTES:
                    method = "auto"
                got, ref = ops.all_reduce(x, method=method), ar.all_reduce_reference(x)
                torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)
            elif op == "all_gather":
                method = ("pull", "push", "ring", "ll", "copy_engine")[int(torch.randint(0, 5, (1,), generator=g))]
                if method == "ll" and (n % 2 or 2 * n > LL_MAX_BYTES):
                    method = "auto"
                assert torch.equal(ops.all_gather(x[:n], method=method), ag.all_gather_reference(x[:n])), f"call {i}"
            elif op == "reduce_scatter":
                method = ("full_mesh", "push", "ring")[int(torch.randint(0, 3, (1,), generator=g))]
                torch.testing.assert_close(ops.reduce_scatter(x, method=method), rs.reduce_scatter_reference(x),
                                           rtol=1.6e-2, atol=1e-2)
            elif i % 8 == 3:  # equal splits
                method = ("kernel", "copy_engine")[int(torch.randint(0, 2, (1,), generator=g))]
                assert torch.equal(ops.all_to_all(x, method=method), a2a.all_to_all_reference(x)), f"call {i}"
            else:  # variable splits: counts[r][j] rows from rank r to rank j, the same table on every rank
                counts = torch.randint(0, 1 + n // w.world_size, (w.world_size, w.world_size), generator=g).tolist()
                ins, outs = counts[w.rank], [counts[r][w.rank] for r in range(w.world_size)]
                xv = x[:sum(ins)].view(-1, 1)
                assert torch.equal(ops.all_to_all_v(xv, ins, outs), a2a.all_to_all_v_reference(xv, ins, outs)), \
                    f"call {i}"
        except Exception as err:  # name the call: the sequence is reproducible from the seed
            raise RuntimeError(f"stress call {i} of {calls} ({op} {method}, n={n}) failed on rank {w.rank}: {err}") \
                from err
    ops.release_contexts()
    return True


@pytest.mark.gpu
def test_collectives_stress(world, seed):
    calls = int(os.environ.get("TRITON_DIST_STRESS_CALLS", "10000"))
    assert all(world.run(_stress, calls, seed, timeout=1800))


@pytest.mark.parametrize("method", ["one_shot", "two_shot", "push_one_shot", "ll", "push_two_shot"])
def test_all_reduce_bf16(world, method, seed):
    world.run(_all_reduce, (4099,), torch.bfloat16, method, seed, 3)


@pytest.mark.parametrize("method", ["pull", "push", "ring", "ll", "copy_engine"])
def test_all_gather_bf16(world, method, seed):
    assert all(world.run(_all_gather, (34, 65), torch.bfloat16, method, seed, 3))


@pytest.mark.parametrize("method", ["full_mesh", "push", "ring"])
def test_reduce_scatter_bf16(world, method, seed):
    assert all(world.run(_reduce_scatter, 37, 129, torch.bfloat16, seed, 3, method))


def _graph_replay(seed):
    """Each op captured once in a CUDA graph (after a warm-up call made its context) and replayed on new data."""
    w = this_world()
    n = 3000
    x = torch.empty(w.world_size * n, device=w.device, dtype=torch.bfloat16)
    outs = {}
    calls = {"all_reduce": lambda: ops.all_reduce(x[:n], out=outs["all_reduce"]),  # auto: ll
             "all_reduce_2": lambda: ops.all_reduce(x[:n], method="two_shot", out=outs["all_reduce_2"]),
             "all_gather": lambda: ops.all_gather(x[:n], out=outs["all_gather"]),  # auto: ll
             "all_gather_2": lambda: ops.all_gather(x[:n], method="pull", out=outs["all_gather_2"]),
             "reduce_scatter": lambda: ops.reduce_scatter(x, out=outs["reduce_scatter"])}
    outs["all_reduce"] = torch.empty(n, device=w.device, dtype=x.dtype)
    outs["all_reduce_2"] = torch.empty(n, device=w.device, dtype=x.dtype)
    outs["all_gather"] = torch.empty(w.world_size * n, device=w.device, dtype=x.dtype)
    outs["all_gather_2"] = torch.empty(w.world_size * n, device=w.device, dtype=x.dtype)
    outs["reduce_scatter"] = torch.empty(n, device=w.device, dtype=x.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.copy_(rand(x.shape, x.dtype, seed + w.rank, w.device))
        for call in calls.values():  # warm-up: contexts are made and kernels compiled outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls.values():
            call()
    for replay in range(3):
        x.copy_(rand(x.shape, x.dtype, seed + 100 * replay + w.rank, w.device))
        triton_dist.barrier()
        graph.replay()
        sync()
        for name in ("all_reduce", "all_reduce_2"):
            torch.testing.assert_close(outs[name], ar.all_reduce_reference(x[:n]), rtol=1.6e-2, atol=1e-2)
        for name in ("all_gather", "all_gather_2"):
            assert torch.equal(outs[name], ag.all_gather_reference(x[:n]))
        torch.testing.assert_close(outs["reduce_scatter"], rs.reduce_scatter_reference(x), rtol=1.6e-2, atol=1e-2)
    ops.release_contexts()
    return True


@pytest.mark.gpu
def test_collectives_replay_in_cuda_graph(world, seed):
    assert all(world.run(_graph_replay, seed))


def _calls_that_differ():
    """Ranks call an op differently (no TRITON_DIST_DEBUG): the kernels compare call signatures at their READY
    rendezvous and every rank raises CallMismatch instead of returning garbage. Each case on a fresh context."""
    w = this_world()
    big = 16
    cases = [  # (context maker, call on rank 0, call on the others)
        (lambda: rs.ReduceScatterContext(w.world_size * big * 3, torch.float32, num_programs=1),
         lambda c: rs.reduce_scatter(torch.ones(w.world_size * 8, 3), ctx=c, method="full_mesh"),
         lambda c: rs.reduce_scatter(torch.ones(w.world_size * big, 3), ctx=c, method="full_mesh")),
        (lambda: ar.AllReduceContext(64, torch.float32, num_programs=1),
         lambda c: ar.all_reduce(torch.ones(40), ctx=c, method="one_shot"),
         lambda c: ar.all_reduce(torch.ones(40), ctx=c, method="two_shot")),
        (lambda: ag.AllGatherContext(64, torch.float32, num_programs=1),
         lambda c: ag.all_gather(torch.ones(10, 2), ctx=c, method="ring"),
         lambda c: ag.all_gather(torch.ones(12, 2), ctx=c, method="ring")),
        (lambda: a2a.AllToAllContext(4096, num_programs=1),
         lambda c: a2a.all_to_all(torch.ones(w.world_size * 2, 3), ctx=c, method="kernel"),
         lambda c: a2a.all_to_all(torch.ones(w.world_size * 3, 3), ctx=c, method="kernel")),
        # LL: no ready round; the call header sent with the words is checked before the words are waited for
        (lambda: ar.AllReduceContext(2048, torch.float32, num_programs=2),
         lambda c: ar.all_reduce(torch.ones(40), ctx=c, method="ll"),
         lambda c: ar.all_reduce(torch.ones(1500), ctx=c, method="ll")),
        (lambda: ag.AllGatherContext(64, torch.float32, num_programs=1),
         lambda c: ag.all_gather(torch.ones(10, 2), ctx=c, method="ll"),
         lambda c: ag.all_gather(torch.ones(12, 2), ctx=c, method="ll")),
    ]
    got = []
    for make, first, others in cases:
        ctx = make()
        try:
            (first if w.rank == 0 else others)(ctx)
            sync()
            got.append(None)
        except triton_dist.CallMismatch as err:
            got.append(str(err))
        triton_dist.barrier()
    return got


def _cpu_world(why: str, **env):
    """A fresh 2-rank CPU world for the tests whose calls stop kernels (skipped on GPUs, where a trap ends the
    process's CUDA context: ``why`` says what covers the case there)."""
    from conftest import BACKEND, new_world
    if BACKEND != "cpu":
        pytest.skip(f"a GPU trap ends the process's CUDA context; {why}")
    return new_world(2, env=env)


def _methods_that_differ():
    """Rank 0 calls all_reduce with LL, the others with one_shot: two protocols that never meet. The LL rank sees,
    in its slow path, that its peer is in a staged call of the same context and raises CallMismatch naming both
    calls and reports it to the world; the staged rank's wait times out and raises CallMismatch quoting that report,
    with its own labelled wait (the op, the signal, the rank that did not arrive)."""
    w = this_world()
    ctx = ar.AllReduceContext(64, torch.float32, num_programs=1)
    try:
        ar.all_reduce(torch.ones(40 if w.rank == 0 else 44), ctx=ctx, method="ll" if w.rank == 0 else "one_shot")
        sync()
    except (triton_dist.CallMismatch, triton_dist.SignalTimeout) as err:
        return type(err).__name__, str(err)
    return None


def test_calls_in_different_protocols_are_named():
    with _cpu_world("the GPU watchdog message uses the same labels", TRITON_DIST_WAIT_TIMEOUT_S="2") as w:
        ll_side, pad_side = w.run(_methods_that_differ, timeout=120)
    assert ll_side[0] == "CallMismatch" and "rank 0 makes an LL call" in ll_side[1], ll_side
    assert "rank 1 is making a staged call of the same context" in ll_side[1], ll_side
    assert "all_reduce(method=ll, float32, 40 elements)" in ll_side[1], ll_side
    assert "all_reduce(method=one_shot, float32, 44 elements, a call this rank made before)" not in ll_side[1]
    # the staged rank's wait times out; rank 0 reported its mismatch meanwhile, so rank 1 raises CallMismatch too,
    # quoting it, with its own wait's labelled message
    assert pad_side[0] == "CallMismatch", pad_side
    assert "rank 1: the call was stopped because rank 0 found the ranks' calls differ" in pad_side[1], pad_side
    assert "rank 0 makes an LL call" in pad_side[1], pad_side
    assert "all_reduce's READY signal of program 0 from rank 0" in pad_side[1], pad_side
    assert "rank 0 has not reached call 1 of this all_reduce context" in pad_side[1], pad_side


def _one_rank_grows_a_context():
    """Both ranks make the all_reduce context with a first call; then rank 0 calls with more elements than it holds
    (so it replaces the context: a collective step) while rank 1 calls with the old size. Rank 0's named barrier
    names rank 1 as missing; rank 1's kernel times out on rank 0's LL call header (auto: LL), labelled, and raises
    CallMismatch quoting rank 0's report."""
    w = this_world()
    ops.all_reduce(torch.ones(100))
    try:
        ops.all_reduce(torch.ones(5000 if w.rank == 0 else 100))
        sync()
    except (triton_dist.CallMismatch, triton_dist.SignalTimeout) as err:
        return type(err).__name__, str(err)
    return None


def _named_barriers():
    w = this_world()
    try:
        w.barrier("step A" if w.rank == 0 else "step B")
    except triton_dist.CallMismatch as err:
        return str(err)
    return None


def test_a_collective_step_only_one_rank_takes_is_named():
    with _cpu_world("the CPU world checks the host side", TRITON_DIST_WAIT_TIMEOUT_S="2") as w:
        grew, stayed = w.run(_one_rank_grows_a_context, timeout=120)
    assert grew[0] == "CallMismatch" and "closing a context of all_reduce" in grew[1], grew
    assert "waited 2 s for ranks [1], which did not come" in grew[1], grew
    # rank 1 waits on rank 0's LL call header, which never comes; rank 0's named barrier reported the mismatch
    assert stayed[0] == "CallMismatch" and "all_reduce's LL call header from rank 0" in stayed[1], stayed
    assert "rank 0 found the ranks' calls differ: rank 0: closing a context of all_reduce" in stayed[1], stayed
    with _cpu_world("the CPU world checks the host side") as w:
        a, b = w.run(_named_barriers, timeout=60)
    assert "rank 0: step A, but rank 1 was step B" in a, a
    assert "rank 1: step B, but rank 0 was step A" in b, b


def test_calls_that_differ_across_ranks_raise_everywhere():
    with _cpu_world("the shared-GPU suite checks one case per world") as w:
        for rank, msgs in enumerate(w.run(_calls_that_differ, timeout=120)):
            for msg in msgs:
                assert msg is not None, (rank, msgs)
                assert "a collective called differently across ranks" in msg and "signature 0x" in msg, msg
