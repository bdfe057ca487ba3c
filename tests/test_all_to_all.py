"""AllToAll (equal and variable splits) on the CPU world, checked exactly against torch.distributed."""
import pytest
import torch

from triton_dist.kernels import all_to_all as a2a
from triton_dist.kernels.all_to_all import (AllToAllContext, all_to_all, all_to_all_reference, all_to_all_v,
                                            all_to_all_v_reference)

from _util import poison, rand, sync, this_world

DTYPES = [torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn]
DTYPE_IDS = ["fp16", "fp32", "int8", "fp8e4m3"]


def _same(a, b):
    """Exact equality of shape, dtype and bytes (fp8 has no torch.equal; NaN payloads compare too)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _nbytes(x):
    return x.numel() * x.element_size()


def _counts(ws, seed, hi=6):
    """counts[i][j]: rows rank i sends to rank j (the same on every rank), with zero-sized splits."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(1, hi, (ws, ws), generator=g)
    for i in range(ws):
        c[i][(i + 1) % ws] = 0  # every rank has a zero split to some peer
    c[0][0] = 0  # and one to itself
    return c.tolist()


def _splits(counts, rank):
    return counts[rank], [row[rank] for row in counts]


# ----------------------------------------------------------------------------------------------- rank bodies
def _equal(dtype, m, row_shape, seed, method="auto"):
    w = this_world()
    x = rand((w.world_size * m,) + row_shape, dtype, seed + w.rank, w.device)
    ctx = AllToAllContext(_nbytes(x), dtype)
    out = poison(torch.empty_like(x))
    got = all_to_all(x, ctx=ctx, out=out, method=method)
    sync()
    ok = got is out and _same(got, all_to_all_reference(x))
    ctx.close()
    return ok


def _variable(dtype, row_shape, seed):
    w = this_world()
    ins, outs = _splits(_counts(w.world_size, seed), w.rank)
    x = rand((sum(ins),) + row_shape, dtype, seed + w.rank, w.device)
    ctx = AllToAllContext(_nbytes(x))
    out = poison(torch.empty((sum(outs),) + row_shape, dtype=dtype, device=w.device))
    got = all_to_all_v(x, ins, outs, ctx=ctx, out=out)
    sync()
    ok = got is out and _same(got, all_to_all_v_reference(x, ins, outs))
    ctx.close()
    return ok


def _odd_shapes(seed):
    """1-D rows, 3-D rows, empty chunks, and tensors at odd addresses (narrower words) on one context."""
    w = this_world()
    ws = w.world_size
    ctx = AllToAllContext(4096)
    results = []
    for i, (shape, dtype) in enumerate([((ws * 7,), torch.float32), ((ws * 2, 3, 5), torch.int8),
                                        ((0, 17), torch.float16), ((ws, 1), torch.int8)]):
        x = rand(shape, dtype, seed + 10 * i + w.rank, w.device)
        out = all_to_all(x, ctx=ctx, out=poison(torch.empty_like(x)))
        results.append(_same(out, all_to_all_reference(x)))
    # rows of 8 bytes, but x and out start one byte off: the kernel must fall back to byte words
    rows = ws * 3
    xbuf = rand((rows * 8 + 1,), torch.int8, seed + 99 + w.rank, w.device)
    x = xbuf[1:].view(rows, 8)
    obuf = poison(torch.empty((rows * 8 + 1,), dtype=torch.int8, device=w.device))
    out = obuf[1:].view(rows, 8)
    all_to_all(x, ctx=ctx, out=out)
    results.append(_same(out, all_to_all_reference(x)) and obuf[0].item() == -7)
    # variable splits with 3-D rows
    ins, outs = _splits(_counts(ws, seed + 7), w.rank)
    x = rand((sum(ins), 2, 3), torch.float16, seed + 50 + w.rank, w.device)
    out = all_to_all_v(x, ins, outs, ctx=ctx)
    results.append(_same(out, all_to_all_v_reference(x, ins, outs)))
    sync()
    ctx.close()
    return results


def _back_to_back(seed, calls, cols, hi):
    """Calls on one context with no barrier in between, different data and splits each time (the epochs); every
    third call has equal splits."""
    w = this_world()
    ws = w.world_size
    ctx = AllToAllContext(ws * hi * cols * 4)
    done = []
    for k in range(calls):
        if k % 3 == 1:
            x = rand((ws * (k % hi + 1), cols), torch.float32, seed + 100 * k + w.rank, w.device)
            method = ("kernel", "copy_engine")[(k // 3) % 2]  # the two methods alternate on one context
            out = all_to_all(x, ctx=ctx, out=poison(torch.empty_like(x)), method=method)
            done.append((x, None, out))
        else:
            ins, outs = _splits(_counts(ws, seed + k, hi), w.rank)
            x = rand((sum(ins), cols), torch.float32, seed + 100 * k + w.rank, w.device)
            out = all_to_all_v(x, ins, outs, ctx=ctx, out=poison(torch.empty((sum(outs), cols), device=w.device)))
            done.append((x, (ins, outs), out))
    sync()
    ok = []
    for x, splits, out in done:
        ref = all_to_all_reference(x) if splits is None else all_to_all_v_reference(x, *splits)
        ok.append(_same(out, ref))
    ctx.close()
    return ok


def _default_context(seed):
    """ctx=None: a module-level context, grown when a call needs more staging."""
    w = this_world()
    ws = w.world_size
    ok = []
    for k, m in enumerate((2, 700)):  # the second call needs more than the first context holds
        x = rand((ws * m, 37), torch.float32, seed + k + w.rank, w.device)
        ok.append(_same(all_to_all(x), all_to_all_reference(x)))
    ins, outs = _splits(_counts(ws, seed, hi=40), w.rank)
    x = rand((sum(ins), 37), torch.float16, seed + 5 + w.rank, w.device)
    ok.append(_same(all_to_all_v(x, ins, outs), all_to_all_v_reference(x, ins, outs)))
    sync()
    a2a.close_default_context()
    return ok


def _references(seed):
    """The references against the definition, from the seeds alone (no communication)."""
    w = this_world()
    ws, me = w.world_size, w.rank
    m = 3
    x = rand((ws * m, 5), torch.float16, seed + me, w.device)
    expect = torch.cat([rand((ws * m, 5), torch.float16, seed + i, w.device)[me * m:(me + 1) * m] for i in range(ws)])
    counts = _counts(ws, seed)
    ins, outs = _splits(counts, me)
    xv = rand((sum(ins), 4), torch.float8_e4m3fn, seed + me, w.device)
    parts = []
    for i in range(ws):
        xi = rand((sum(counts[i]), 4), torch.float8_e4m3fn, seed + i, w.device)
        start = sum(counts[i][:me])
        parts.append(xi[start:start + counts[i][me]])
    return _same(all_to_all_reference(x), expect) and _same(all_to_all_v_reference(xv, ins, outs), torch.cat(parts))


def _bad_inputs():
    w = this_world()
    ws = w.world_size
    ctx = AllToAllContext(1024, torch.float32)
    x = torch.ones((ws * 4, 8), dtype=torch.float32, device=w.device)
    good = [4] * ws
    with pytest.raises(ValueError, match="one entry per rank"):
        all_to_all_v(x, [4] * (ws + 1), good, ctx=ctx)
    with pytest.raises(ValueError, match="one entry per rank"):
        all_to_all_v(x, good, [4] * (ws - 1), ctx=ctx)
    with pytest.raises(ValueError, match="ints >= 0"):
        all_to_all_v(x, [-1, 4 * ws + 1] + [0] * (ws - 2), good, ctx=ctx)
    with pytest.raises(ValueError, match="input_split_sizes sum to"):
        all_to_all_v(x, [3] * ws, good, ctx=ctx)
    with pytest.raises(ValueError, match="output_split_sizes sum to"):
        all_to_all_v(x, good, good, ctx=ctx, out=torch.empty((ws * 4 + 1, 8), device=w.device))
    with pytest.raises(TypeError, match="list of"):
        all_to_all_v(x, 4, good, ctx=ctx)
    with pytest.raises(ValueError, match="contiguous"):
        all_to_all(x.t(), ctx=ctx)
    with pytest.raises(ValueError, match="contiguous"):
        all_to_all(x, ctx=ctx, out=torch.empty((8, ws * 4), device=w.device).t())
    with pytest.raises(ValueError, match="not a multiple of the world size"):
        all_to_all(x[:ws * 4 - 1], ctx=ctx)
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        all_to_all(x, ctx=ctx, method="dma")
    with pytest.raises(ValueError, match="out is torch.float16"):
        all_to_all(x, ctx=ctx, out=torch.empty(x.shape, dtype=torch.float16, device=w.device))
    with pytest.raises(ValueError, match="expected"):
        all_to_all(x, ctx=ctx, out=torch.empty((ws * 4, 9), device=w.device))
    with pytest.raises(ValueError, match="made for torch.float32"):
        all_to_all(x.half(), ctx=ctx)
    with pytest.raises(TypeError, match="not supported"):
        all_to_all(torch.ones((ws, 2), dtype=torch.complex64, device=w.device), ctx=ctx)
    with pytest.raises(ValueError, match="make a larger AllToAllContext"):
        all_to_all(torch.ones((ws * 64, 8), device=w.device), ctx=ctx)
    with pytest.raises(ValueError, match="at least one dimension"):
        all_to_all(torch.ones((), device=w.device), ctx=ctx)
    # the failed calls launched nothing: the context still works
    xr = rand((ws * 4, 8), torch.float32, 1234 + w.rank, w.device)
    ok = _same(all_to_all(xr, ctx=ctx), all_to_all_reference(xr))
    sync()
    ctx.close()
    return ok


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["kernel", "copy_engine"])
def test_all_to_all_matches_reference(world, dtype, method, seed):
    assert all(world.run(_equal, dtype, 5, (123,), seed, method))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_to_all_v_matches_reference(world, dtype, seed):
    assert all(world.run(_variable, dtype, (123,), seed))


def test_odd_world_and_shapes(world3, seed):
    assert all(world3.run(_equal, torch.float16, 5, (123,), seed))
    assert all(world3.run(_equal, torch.float16, 5, (123,), seed, "copy_engine"))
    assert all(world3.run(_variable, torch.int8, (123,), seed))
    for results in world3.run(_odd_shapes, seed):
        assert results == [True] * 6


def test_back_to_back_calls_on_one_context(world, seed):
    for results in world.run(_back_to_back, seed, 7, 123, 6):
        assert results == [True] * 7


def test_default_context_grows(world, seed):
    for results in world.run(_default_context, seed):
        assert results == [True, True, True]


def test_references_match_the_definition(world, seed):
    assert all(world.run(_references, seed))


def test_bad_inputs_raise(world):
    assert all(world.run(_bad_inputs))


@pytest.mark.parametrize("row_shape", [(123,), (4096,)], ids=["odd_row", "wide_row"])
def test_bf16(world, row_shape, seed):
    assert all(world.run(_equal, torch.bfloat16, 37, row_shape, seed))
    assert all(world.run(_variable, torch.bfloat16, row_shape, seed))


@pytest.mark.gpu
def test_many_back_to_back_calls_on_gpu(world, seed):
    """Memory ordering and buffer reuse under real concurrency: 300 calls, no barrier between them."""
    for results in world.run(_back_to_back, seed, 300, 4099, 40):
        assert results == [True] * 300


def _disagreeing_splits(seed):
    """Rank 0 sends rank 1 one row more than rank 1 expects: both ranks stop the call with CallMismatch (device-side
    check, no host sync); nothing returns silently."""
    import triton_dist
    w = this_world()
    ins, outs = [3] * w.world_size, [3] * w.world_size
    if w.rank == 0:
        ins[1] = 4
    x = rand((sum(ins), 5), torch.float32, seed + w.rank, w.device)
    ctx = AllToAllContext(4096)
    try:
        all_to_all_v(x, ins, outs, ctx=ctx)
        sync()
    except triton_dist.CallMismatch as err:
        return str(err)
    return None


@pytest.mark.timeout(120)
def test_disagreeing_splits_stop_both_ranks(seed):
    from conftest import new_world
    with new_world(2) as w:
        got = w.run(_disagreeing_splits, seed, timeout=90)
    from conftest import BACKEND
    if BACKEND == "cpu":
        assert "rank 0 sends 4 rows to rank 1 (its input_split_sizes[1])" in got[0] and "expects 3" in got[0], got
        assert "rank 1 expects 3 rows from rank 0" in got[1] and "sends it 4 rows" in got[1], got
    else:
        # every rank raises CallMismatch: its own check's, or (on a shared GPU under MPS, where the first trap stops
        # every rank's kernel) the peer's reported one (World.report_mismatch)
        assert all(m and "all_to_all_v called differently across ranks" in m for m in got), got
