"""Overlapped GEMMs (AllGather+GEMM, GEMM+ReduceScatter, GEMM+AllReduce) against fp64 and their torch references
(CPU world: fp32, fp16 and bf16, small odd shapes; the GPU suite runs the same tests, plus larger bf16 ones, on CUDA
worlds)."""
import hashlib
import os
import time

import pytest
import torch
import triton
import triton.language as tl

from triton_dist import ops
from triton_dist.kernels import ag_gemm as agm
from triton_dist.kernels import gemm_ar as gar
from triton_dist.kernels import gemm_rs as grs
from triton_dist.kernels.gemm import GemmConfig, chunk_first_tile, grouped_tile

from _util import poison, rand, sync, this_world

BACKEND = os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # bf16 in the CPU world too (language/_interp_mend.py)
LAYOUTS = ("row", "t", "strided")  # B row-major (TMA), w.t() of a weight (TMA, transposed), strided (pointers)
SMALL = GemmConfig(16, 16, 16, group_m=2, num_stages=1, num_warps=4)  # many tiles: partial tiles, grouping


def make_b(k, n, dtype, seed, layout, device):
    """This rank's B (k x n) in one of LAYOUTS, from fresh random data."""
    if layout == "row":
        return rand((k, n), dtype, seed, device)
    if layout == "t":
        return rand((n, k), dtype, seed, device).t()
    return rand((k, 2 * n), dtype, seed, device)[:, ::2]


def check_gemm(got, exact, ref, dtype, what=""):
    """fp32: tight tolerance against fp64. Low precision: our error against fp64 at most twice the error of torch's
    own low-precision path (``ref``), plus one ulp of the largest value."""
    assert torch.isfinite(got).all(), f"{what}: NaN/inf in the output (unwritten, poisoned elements?)"
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4, msg=what)
        return
    ours = (got.double() - exact).abs().max().item()
    theirs = (ref.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert ours <= 2 * theirs + ulp, f"{what}: max error {ours:.3g}, torch's {dtype} path {theirs:.3g}"


# ------------------------------------------------------------------------------------------------ rank bodies
def _ag_gemm_calls(ctx, method, dtype, m_locs, k, n, seed, layouts=LAYOUTS):
    w = this_world()
    for call, m_loc in enumerate(m_locs):
        s = seed + 1000 * call
        shards = [rand((m_loc, k), dtype, s + r, w.device) for r in range(w.world_size)]
        b = make_b(k, n, dtype, s + 100 + w.rank, layouts[call % len(layouts)], w.device)
        out = poison(torch.empty((w.world_size * m_loc, n), dtype=dtype, device=w.device))
        meth = method if isinstance(method, str) else method[call % len(method)]
        got, gathered = agm.ag_gemm(shards[w.rank], b, ctx=ctx, method=meth, return_gathered=True, out=out)
        sync()
        assert got is out
        full = torch.cat(shards)
        assert torch.equal(gathered, full), f"call {call} ({meth}): gathered A differs"
        ref, ref_gathered = agm.ag_gemm_reference(shards[w.rank], b, return_gathered=True)
        assert torch.equal(ref_gathered, full)
        check_gemm(got, full.double() @ b.double(), ref, dtype, f"ag_gemm call {call} ({meth}, m_loc {m_loc})")


def _ag_gemm(method, dtype, m_locs, k, n, seed, config=None, comm_programs=None):
    w = this_world()
    ctx = agm.AGGemmContext(w.world_size * max(m_locs), k, n, dtype, config=config, comm_programs=comm_programs)
    _ag_gemm_calls(ctx, method, dtype, m_locs, k, n, seed)
    ctx.close()
    return True


def _partials(m, k, n, dtype, seed, layout):
    """Every rank's (a, b) of a call, the same on all ranks, and the exact fp64 sum of their products."""
    w = this_world()
    a_all = [rand((m, k), dtype, seed + r, w.device) for r in range(w.world_size)]
    b_all = [make_b(k, n, dtype, seed + 100 + r, layout, w.device) for r in range(w.world_size)]
    exact = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
    return a_all[w.rank], b_all[w.rank], exact


def _gemm_rs_calls(ctx, method, dtype, m_locs, k, n, seed):
    w = this_world()
    for call, m_loc in enumerate(m_locs):
        meth = method if isinstance(method, str) else method[call % len(method)]
        a, b, exact = _partials(w.world_size * m_loc, k, n, dtype, seed + 1000 * call, LAYOUTS[call % 3])
        out = poison(torch.empty((m_loc, n), dtype=dtype, device=w.device))
        got = grs.gemm_rs(a, b, ctx=ctx, method=meth, out=out)
        sync()
        assert got is out
        rows = slice(w.rank * m_loc, (w.rank + 1) * m_loc)
        check_gemm(got, exact[rows], grs.gemm_rs_reference(a, b), dtype, f"gemm_rs call {call} ({meth})")


def _gemm_rs(method, dtype, m_locs, k, n, seed, partial_dtype=None, config=None):
    w = this_world()
    ctx = grs.GemmRSContext(w.world_size * max(m_locs), k, n, dtype, partial_dtype=partial_dtype, config=config)
    _gemm_rs_calls(ctx, method, dtype, m_locs, k, n, seed)
    ctx.close()
    return True


def _gemm_ar_calls(ctx, method, dtype, ms, k, n, seed):
    w = this_world()
    digests = []
    for call, m in enumerate(ms):
        meth = method if isinstance(method, str) else method[call % len(method)]
        a, b, exact = _partials(m, k, n, dtype, seed + 1000 * call, LAYOUTS[call % 3])
        out = poison(torch.empty((m, n), dtype=dtype, device=w.device))
        got = gar.gemm_ar(a, b, ctx=ctx, method=meth, out=out)
        sync()
        assert got is out
        check_gemm(got, exact, gar.gemm_ar_reference(a, b), dtype, f"gemm_ar call {call} ({meth})")
        digests.append(hashlib.sha1(got.cpu().view(torch.uint8).numpy().tobytes()).hexdigest())
    return digests


def _gemm_ar(method, dtype, ms, k, n, seed, partial_dtype=None, config=None):
    ctx = gar.GemmARContext(max(ms), k, n, dtype, partial_dtype=partial_dtype, config=config)
    digests = _gemm_ar_calls(ctx, method, dtype, ms, k, n, seed)
    ctx.close()
    return digests


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", agm.METHODS)
def test_ag_gemm(world, method, dtype, seed):
    """Three back-to-back calls on one context, M shrinking (37, 5, 20 rows per rank), one B layout each."""
    assert all(world.run(_ag_gemm, method, dtype, [37, 5, 20], 104, 72, seed))


def test_ag_gemm_small_tiles(world, seed):
    """16x16x16 tiles (several row tiles per chunk, grouped order), three pull programs; the third call's chunks are
    a whole number of row tiles (32 rows), so its tiles are TMA stores (gemm.store_c)."""
    assert all(world.run(_ag_gemm, ("sm", "copy_engine"), torch.float16, [37, 19, 32], 40, 40, seed, SMALL, 3))


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", grs.METHODS)
def test_gemm_rs(world, method, dtype, seed):
    assert all(world.run(_gemm_rs, method, dtype, [37, 5, 20], 104, 72, seed))


def test_gemm_rs_fp32_partials_small_tiles(world, seed):
    assert all(world.run(_gemm_rs, ("fused", "sequential_reduce"), torch.float16, [21, 7], 40, 40, seed,
                         torch.float32, SMALL))


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", gar.METHODS)
def test_gemm_ar(world, method, dtype, seed):
    results = world.run(_gemm_ar, method, dtype, [37, 1, 20], 104, 72, seed)
    assert all(r == results[0] for r in results), "every rank must get bit-identical results"


def test_gemm_ar_fp32_partials_small_tiles(world, seed):
    results = world.run(_gemm_ar, "fused", torch.float16, [33, 2], 40, 40, seed, torch.float32, SMALL)
    assert all(r == results[0] for r in results), "every rank must get bit-identical results"


def _alternate(seed):
    """Methods alternate on one context per op, sizes changing: the signals of one method must not confuse the
    next (epochs, done handshakes, flags)."""
    w = this_world()
    k, n = 48, 40
    ctx = agm.AGGemmContext(w.world_size * 24, k, n, torch.float32)
    _ag_gemm_calls(ctx, ("copy_engine", "sm", "sequential", "sm", "copy_engine", "copy_engine"), torch.float32,
                   [24, 9, 3, 24, 1, 17], k, n, seed)
    ctx.close()
    ctx = grs.GemmRSContext(w.world_size * 24, k, n, torch.float32)
    _gemm_rs_calls(ctx, ("fused", "decomposed", "sequential_reduce", "sequential", "decomposed", "fused"),
                   torch.float32, [24, 9, 3, 1, 17, 6], k, n, seed)
    ctx.close()
    ctx = gar.GemmARContext(40, k, n, torch.float32)
    _gemm_ar_calls(ctx, ("fused", "sequential", "fused", "fused"), torch.float32, [40, 9, 1, 33], k, n, seed)
    ctx.close()
    return True


def test_methods_alternate_on_one_context(world, seed):
    assert all(world.run(_alternate, seed))


class _SlowView:
    """A peer view whose slices are taken 200 ms late (a slow reader, for the straggler test)."""

    def __init__(self, t):
        self.t = t

    def __getitem__(self, idx):
        time.sleep(0.2)
        return self.t[idx]


def _straggler(op, seed, calls=6):
    """Back-to-back calls of one op while rank 0 lags (it sleeps before each call; results are checked only at the
    end, so the fast ranks run ahead): the done handshakes must keep them from overwriting buffers rank 0 still
    reads."""
    w = this_world()
    k, n, m_loc = 32, 32, 16
    if op == "ag_gemm":
        ctx = agm.AGGemmContext(w.world_size * m_loc, k, n, torch.float32)
        if w.rank == 0:  # rank 0 reads its peers late: each copy-engine copy starts 200 ms after the handshake
            ctx.peer_gathered = [_SlowView(t) for t in ctx.peer_gathered]
    elif op == "gemm_rs":
        ctx = grs.GemmRSContext(w.world_size * m_loc, k, n, torch.float32)
    else:  # one program: a rank runs on into the next call right after its last wait
        ctx = gar.GemmARContext(w.world_size * m_loc, k, n, torch.float32, num_programs=1)
    runs = []
    for call in range(calls):
        if w.rank == 0:
            time.sleep(0.05)
        s = seed + 1000 * call
        if op == "ag_gemm":
            shards = [rand((m_loc, k), torch.float32, s + r, w.device) for r in range(w.world_size)]
            b = rand((k, n), torch.float32, s + 100 + w.rank, w.device)
            got = agm.ag_gemm(shards[w.rank], b, ctx=ctx, method=("copy_engine", "sm")[call % 2])
            runs.append((got, torch.cat(shards).double() @ b.double()))
        elif op == "gemm_rs":
            a, b, exact = _partials(w.world_size * m_loc, k, n, torch.float32, s, "row")
            got = grs.gemm_rs(a, b, ctx=ctx, method=("fused", "sequential_reduce", "decomposed")[call % 3])
            runs.append((got, exact[w.rank * m_loc:(w.rank + 1) * m_loc]))
        else:
            a, b, exact = _partials(w.world_size * m_loc, k, n, torch.float32, s, "row")
            runs.append((gar.gemm_ar(a, b, ctx=ctx, method="fused"), exact))
    sync()
    for call, (got, exact) in enumerate(runs):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4, msg=f"{op} call {call}")
    ctx.close()
    return True


@pytest.mark.parametrize("op", ["ag_gemm", "gemm_rs", "gemm_ar"])
def test_straggler(world, op, seed):
    assert all(world.run(_straggler, op, seed))


def _odd_world(seed):
    # K = 26 fp32: rows of A are 104 bytes, not a multiple of 16, so A takes the pointer path
    _ag_gemm(("copy_engine", "sm"), torch.float32, [13, 6], 26, 40, seed)
    _gemm_rs(("fused", "sequential_reduce"), torch.float32, [13, 6], 26, 40, seed)
    return _gemm_ar("fused", torch.float32, [13, 6], 26, 40, seed)


def test_odd_world(world3, seed):
    """Three ranks (chunks rotate over an odd count), and A rows that TMA cannot describe."""
    results = world3.run(_odd_world, seed)
    assert all(r == results[0] for r in results)


def _ops_api(seed):
    """The public ops: cached contexts that grow, auto methods, out=, every float dtype of the backend."""
    w = this_world()
    k, n = 40, 24
    for dtype in FLOATS:
        for m_loc in (3, 40):  # the second size grows the cached contexts (and auto picks overlap for ag/rs)
            s = seed + m_loc
            shards = [rand((m_loc, k), dtype, s + r, w.device) for r in range(w.world_size)]
            b = make_b(k, n, dtype, s + 50 + w.rank, "t", w.device)
            full = torch.cat(shards)
            for method in ("auto",) + agm.METHODS:
                got, gathered = ops.ag_gemm(shards[w.rank], b, method=method, return_gathered=True)
                assert torch.equal(gathered, full)
                check_gemm(got, full.double() @ b.double(), agm.ag_gemm_reference(shards[w.rank], b), dtype,
                           f"ops.ag_gemm {method}")
            a, b, exact = _partials(w.world_size * m_loc, k, n, dtype, s, "row")
            rows = slice(w.rank * m_loc, (w.rank + 1) * m_loc)
            for method in ("auto",) + grs.METHODS:
                out = poison(torch.empty((m_loc, n), dtype=dtype, device=w.device))
                assert ops.gemm_rs(a, b, method=method, out=out) is out
                check_gemm(out, exact[rows], grs.gemm_rs_reference(a, b), dtype, f"ops.gemm_rs {method}")
            a, b, exact = _partials(m_loc, k, n, dtype, s + 7, "strided")
            for method in ("auto",) + gar.METHODS:
                check_gemm(ops.gemm_ar(a, b, method=method), exact, gar.gemm_ar_reference(a, b), dtype,
                           f"ops.gemm_ar {method}")
    ops.release_contexts()
    return True


def test_ops_api(world, seed):
    assert all(world.run(_ops_api, seed))


def _bad_inputs():
    w = this_world()
    dev = w.device
    f32 = dict(dtype=torch.float32, device=dev)
    with pytest.raises(TypeError, match="int32; expected bfloat16, float16 or float32"):
        ops.ag_gemm(torch.ones(4, 8, dtype=torch.int32, device=dev), torch.ones(8, 4, dtype=torch.int32, device=dev))
    with pytest.raises(TypeError, match="same dtype"):
        ops.gemm_ar(torch.ones(4, 8, **f32), torch.ones(8, 4, dtype=torch.float16, device=dev))
    with pytest.raises(ValueError, match=r"multiple of the world size"):
        ops.gemm_rs(torch.ones(w.world_size * 3 + 1, 8, **f32), torch.ones(8, 4, **f32))
    with pytest.raises(ValueError, match=r"expected b.shape\[0\] == a.shape\[1\]"):
        ops.gemm_ar(torch.ones(4, 8, **f32), torch.ones(9, 4, **f32))
    with pytest.raises(ValueError, match="a must be contiguous"):
        ops.ag_gemm(torch.ones(8, 4, **f32).t(), torch.ones(8, 4, **f32))
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.gemm_rs(torch.ones(8, **f32), torch.ones(8, 4, **f32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.gemm_ar([[1.0]], torch.ones(1, 4, **f32))
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        ops.gemm_ar(torch.ones(4, 8, **f32), torch.ones(8, 4, **f32), method="bogus")
    with pytest.raises(ValueError, match=r"gemm_ar: out must be a contiguous \(4, 4\)"):
        ops.gemm_ar(torch.ones(4, 8, **f32), torch.ones(8, 4, **f32), method="sequential",
                    out=torch.empty(4, 5, **f32))
    ctx = agm.AGGemmContext(w.world_size * 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="context is for up to M="):
        agm.ag_gemm(torch.ones(9, 16, **f32), torch.ones(16, 16, **f32), ctx=ctx)
    with pytest.raises(ValueError, match="context is for K=16, N=16"):
        agm.ag_gemm(torch.ones(8, 24, **f32), torch.ones(24, 16, **f32), ctx=ctx)
    with pytest.raises(TypeError, match="context is for torch.float32"):
        agm.ag_gemm(torch.ones(8, 16, dtype=torch.float16, device=dev),
                    torch.ones(16, 16, dtype=torch.float16, device=dev), ctx=ctx)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        agm.ag_gemm(torch.ones(8, 16, **f32), torch.ones(16, 16, **f32), ctx=ctx, out=torch.empty(8, 16, **f32))
    ctx.close()
    with pytest.raises(ValueError, match="comm_programs < num_programs"):
        agm.AGGemmContext(8, 16, 16, torch.float32, comm_programs=4, num_programs=4)
    with pytest.raises(TypeError, match="dtype torch.int8 is not supported"):
        grs.GemmRSContext(8, 16, 16, torch.int8)
    ctx = grs.GemmRSContext(w.world_size * 4, 16, 16, torch.float16, partial_dtype=torch.float32)
    h = dict(dtype=torch.float16, device=dev)
    with pytest.raises(ValueError, match="'decomposed' sends torch.matmul's torch.float16 partials"):
        grs.gemm_rs(torch.ones(w.world_size * 4, 16, **h), torch.ones(16, 16, **h), ctx=ctx, method="decomposed")
    ctx.close()
    ops.release_contexts()
    return True


def test_bad_input(world2):
    assert all(world2.run(_bad_inputs))


def test_config_validation():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        GemmConfig(block_m=24)
    with pytest.raises(ValueError, match="num_warps"):
        GemmConfig(num_warps=3)


@triton.jit
def _chunk_order_kernel(out_ptr, tiles_m, tiles_n, first, world, GROUP_M: tl.constexpr):
    """The ops' persistent loop over chunks (``chunk_first_tile`` + ``grouped_tile``, chunks rotating from
    ``first``): at row ``i * per_chunk + t`` (the loop's tile index) the (chunk, pid_m, pid_n) it ran."""
    per_chunk = tiles_m * tiles_n
    for i in range(world):
        chunk = (first + i) % world
        for t in range(chunk_first_tile(i, per_chunk), per_chunk, tl.num_programs(0)):
            pid_m, pid_n = grouped_tile(t, tiles_m, tiles_n, GROUP_M)
            row = out_ptr + 3 * (i * per_chunk + t)
            tl.store(row, chunk)
            tl.store(row + 1, pid_m)
            tl.store(row + 2, pid_n)


@pytest.mark.skipif(BACKEND != "cpu", reason="interpreter check of the tile order")
def test_chunk_tile_order():
    """Chunks rotate from `first`; inside a chunk every tile comes exactly once, GROUP_M row tiles at a time; and any
    number of programs splits the loop's tiles among them without a gap or an overlap."""
    world, tiles_m, tiles_n, first = 3, 5, 4, 2
    out = torch.full((world * tiles_m * tiles_n * 3,), -1, dtype=torch.int32)
    _chunk_order_kernel[(1,)](out, tiles_m, tiles_n, first, world, GROUP_M=2)
    rows = out.view(-1, 3).tolist()
    per_chunk = tiles_m * tiles_n
    for i in range(world):
        part = rows[i * per_chunk:(i + 1) * per_chunk]
        assert {c for c, _, _ in part} == {(first + i) % world}
        assert sorted((m, n) for _, m, n in part) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
        assert [m for _, m, _ in part[:2 * tiles_n]] == [0, 1] * tiles_n  # first group: rows 0 and 1, by column
    for nprog in (3, 7, 64):  # fewer and more programs than a chunk's 20 tiles
        split = torch.full_like(out, -1)
        _chunk_order_kernel[(nprog,)](split, tiles_m, tiles_n, first, world, GROUP_M=2)
        assert torch.equal(split, out), nprog


def _gemm_calls_that_differ():
    """Rank 0 calls each overlapped GEMM with other rows (or another method) than the others (no TRITON_DIST_DEBUG):
    the ready round's signature (ag_gemm) or the call headers (gemm_rs, gemm_ar) stop the call with CallMismatch on
    the ranks that compare, instead of garbage or a wait for tiles that never come. Each case on a fresh context."""
    import triton_dist
    w = this_world()
    ws, k, n = w.world_size, 16, 8
    b = rand((k, n), torch.float32, 5, w.device)
    m0 = 3 if w.rank == 0 else 5
    cases = [
        ("ag_gemm sm", lambda: agm.AGGemmContext(ws * 8, k, n, torch.float32, config=SMALL),
         lambda c: agm.ag_gemm(rand((m0, k), torch.float32, 1, w.device), b, ctx=c, method="sm")),
        ("ag_gemm copy_engine", lambda: agm.AGGemmContext(ws * 8, k, n, torch.float32, config=SMALL),
         lambda c: agm.ag_gemm(rand((m0, k), torch.float32, 1, w.device), b, ctx=c, method="copy_engine")),
        ("ag_gemm methods", lambda: agm.AGGemmContext(ws * 8, k, n, torch.float32, config=SMALL),
         lambda c: agm.ag_gemm(rand((4, k), torch.float32, 1, w.device), b, ctx=c,
                               method="sm" if w.rank == 0 else "sequential")),
        ("gemm_rs fused", lambda: grs.GemmRSContext(ws * 8, k, n, torch.float32, config=SMALL),
         lambda c: grs.gemm_rs(rand((ws * m0, k), torch.float32, 1, w.device), b, ctx=c, method="fused")),
        ("gemm_rs methods", lambda: grs.GemmRSContext(ws * 8, k, n, torch.float32, config=SMALL),
         lambda c: grs.gemm_rs(rand((ws * 4, k), torch.float32, 1, w.device), b, ctx=c,
                               method="sequential_reduce" if w.rank == 0 else "decomposed")),
        ("gemm_ar fused", lambda: gar.GemmARContext(8, k, n, torch.float32),
         lambda c: gar.gemm_ar(rand((m0, k), torch.float32, 1, w.device), b, ctx=c, method="fused")),
    ]
    got = {}
    for name, make, call in cases:
        ctx = make()
        try:
            call(ctx)
            sync()
            got[name] = None
        except triton_dist.CallMismatch as err:
            got[name] = str(err)
        triton_dist.barrier()
    return got


def test_gemm_calls_that_differ_across_ranks_raise():
    from conftest import new_world
    if BACKEND != "cpu":
        pytest.skip("a GPU trap ends the process's CUDA context: the GPU suite checks the collectives' case")
    with new_world(2, env={"TRITON_DIST_WAIT_TIMEOUT_S": "20"}) as w:
        per_rank = w.run(_gemm_calls_that_differ, timeout=240)
    for name in per_rank[0]:
        msgs = [per_rank[r][name] for r in range(2)]
        # every rank that compares raises; in the CPU world each rank compares every peer's call
        assert all(m is not None and "called differently across ranks" in m for m in msgs), (name, msgs)
    assert "gemm_rs(method=fused" in per_rank[0]["gemm_rs fused"], per_rank[0]["gemm_rs fused"]


def _world_of_one(seed):
    """World size 1: ag_gemm reads A itself and gemm_rs stores straight into out (no communication), every method,
    both layouts, odd shapes; and an A whose base is not 16-byte aligned (TMA cannot read it: both A operands of
    the kernel take the pointer path)."""
    w = this_world()
    for dtype in (torch.float32, torch.bfloat16):
        _ag_gemm(agm.METHODS, dtype, [13, 64, 6], 32, 40, seed)  # 64 rows: whole row tiles, TMA stores
        _gemm_rs(grs.METHODS, dtype, [13, 40, 6], 32, 40, seed)
    ctx = agm.AGGemmContext(16, 32, 24, torch.float32)
    a = rand((16 * 32 + 1,), torch.float32, seed, w.device)[1:].view(16, 32)
    b = rand((32, 24), torch.float32, seed + 1, w.device)
    for method in ("copy_engine", "sm"):
        got = agm.ag_gemm(a, b, ctx=ctx, method=method, out=poison(torch.empty((16, 24), device=w.device)))
        sync()
        check_gemm(got, a.double() @ b.double(), a @ b, torch.float32, f"misaligned A, {method}")
    ctx.close()
    return True


def test_dense_config_follows_the_waves():
    """128 x 256 tiles unless 128 x 128 ones fill the waves of the SMs >= 6 % better (M=1024 N=29568 on 132 SMs:
    928 wide tiles are 7.03 waves, 1848 narrow ones exactly 14); fp32 and the CPU world have their own."""
    from types import SimpleNamespace
    from triton_dist.kernels import gemm
    wide, narrow = gemm.GPU_CONFIG_16BIT, gemm.GPU_CONFIG_16BIT_NARROW
    assert abs(gemm.wave_efficiency(1024, 29568, wide, 132) - 0.875) < 1e-3
    assert gemm.wave_efficiency(1024, 29568, narrow, 132) == 1.0
    gpu = SimpleNamespace(interpreted=False, num_sms=132)
    assert gemm.default_config(torch.bfloat16, gpu, m=1024, n=29568) == narrow
    for m, n in ((8192, 7168), (4096, 2048), (2048, 8192), (1024, 4096)):
        assert gemm.default_config(torch.bfloat16, gpu, m=m, n=n) == wide, (m, n)
    assert gemm.default_config(torch.bfloat16, gpu) == wide
    assert gemm.default_config(torch.float32, gpu, m=1024, n=29568) == gemm.GPU_CONFIG_FP32
    assert gemm.default_config(torch.bfloat16, SimpleNamespace(interpreted=True), m=1024, n=29568) == \
        gemm.CPU_CONFIG


def test_world_of_one(seed):
    from conftest import new_world
    with new_world(1) as w:
        assert w.run(_world_of_one, seed, timeout=600) == [True]
