"""All-to-all + GEMM (``moe.a2a_gemm``): equal to ``all_to_all_single`` then ``torch.matmul`` on the CPU world;
uneven and empty splits, a rank that receives nothing, back-to-back calls (both buffer parities), device splits."""
import torch

from triton_dist import moe

from _util import rand, this_world


def _splits(world, seed, call):
    """The [W, W] split matrix (rank i sends splits[i][j] rows to rank j), the same on every rank."""
    g = torch.Generator().manual_seed(seed + call)
    s = torch.randint(0, 5, (world, world), generator=g)
    if call == 1:
        s[:, world - 1] = 0  # the last rank receives nothing
        s[0, :] = 0  # rank 0 sends nothing
    return s.tolist()


def _body(k, n, dtype, seed, calls, device_splits):
    w = this_world()
    W = w.world_size
    ctx = moe.A2AGemmContext(4 * W, k, dtype)
    ok = True
    for call in range(calls):
        table = _splits(W, seed, call)
        ins = table[w.rank]
        outs = [table[s][w.rank] for s in range(W)]
        x = rand((sum(ins), k), dtype, seed + 10 * call + w.rank, w.device)
        wt = rand((k, n), dtype, seed + 100 + w.rank, w.device) * 0.1
        splits = torch.tensor(ins, dtype=torch.int32, device=w.device) if device_splits else ins
        got = moe.a2a_gemm(x, wt, splits, sum(outs), ctx=ctx)
        want = moe.a2a_gemm_reference(x, wt, ins, outs)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok &= got.shape == want.shape and torch.allclose(got.float(), want, atol=tol, rtol=tol)
    ctx.close()
    return bool(ok)


def test_a2a_gemm_matches_torch(world, seed):
    assert all(world.run(_body, 24, 40, torch.float32, seed, 3, False))


def test_odd_world_bf16_device_splits(world3, seed):
    assert all(world3.run(_body, 32, 16, torch.bfloat16, seed, 2, True))


def _bad(case):
    w = this_world()
    ctx = moe.A2AGemmContext(4, 16, torch.float32)
    x = torch.ones((2, 16), device=w.device)
    calls = {"w": lambda: moe.a2a_gemm(x, torch.ones((8, 4)), [2] + [0] * (w.world_size - 1), 2, ctx=ctx),
             "splits": lambda: moe.a2a_gemm(x, torch.ones((16, 4)), [3] + [0] * (w.world_size - 1), 2, ctx=ctx),
             "out_rows": lambda: moe.a2a_gemm(x, torch.ones((16, 4)), [2] + [0] * (w.world_size - 1), 10 ** 6,
                                              ctx=ctx)}
    try:
        calls[case]()
    except (ValueError, TypeError) as e:
        return str(e)
    finally:
        ctx.close()
    return "no error"


def test_bad_input(world2):
    for case, needle in (("w", "w must be [16, N]"), ("splits", "summing to x's 2 rows"),
                         ("out_rows", "out_rows must be an int in")):
        assert all(needle in m for m in world2.run(_bad, case))
