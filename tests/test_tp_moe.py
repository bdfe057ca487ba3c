"""Tensor-parallel MoE (``ops.ag_moe``, ``ops.moe_rs``, ``ops.moe_ar``, ``ops.moe_plan`` / ``ops.moe_gemm``) on the
CPU world against the torch references (fp32 einsums over the gathered tokens); both gather methods, experts that
get no token, odd sizes, bf16."""
import pytest
import torch

from triton_dist import ops
from triton_dist.kernels.moe.tp_moe import plan_rows_to_pairs

from _util import rand, this_world


def _ids(tokens, k, experts, seed):
    """k distinct experts per token; the last expert never chosen (an empty group on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)


def _act(h):
    return (torch.nn.functional.silu(h.float()) * 0.5).to(h.dtype)


def _tp_body(t_loc, hidden, n_loc, experts, k, dtype, seed, method):
    w = this_world()
    x = rand((t_loc, hidden), dtype, seed + w.rank, w.device)
    ids = _ids(t_loc, k, experts, seed + 10 + w.rank).to(w.device)
    wts = rand((t_loc, k), torch.float32, seed + 20 + w.rank, w.device).abs()
    w1 = rand((experts, hidden, n_loc), dtype, seed + 30 + w.rank, w.device) * 0.1
    w2 = rand((experts, n_loc, hidden), dtype, seed + 40 + w.rank, w.device) * 0.1
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    h, plan = ops.ag_moe(x, w1, ids, wts, method=method)
    ok = h.shape == (w.world_size * t_loc * k, n_loc) and plan.num_rows == h.shape[0]
    ok &= torch.allclose(plan_rows_to_pairs(h, plan).float(), ops.ag_moe_reference(x, w1, ids, wts), **tol)
    a = _act(h)
    out = ops.moe_rs(a, w2, plan)
    want = ops.moe_rs_reference(plan_rows_to_pairs(a, plan), w2, ids, wts)
    ok &= out.shape == (t_loc, hidden) and out.dtype == dtype and torch.allclose(out.float(), want, **tol)
    ok &= torch.equal(ops.moe_rs(a, w2, plan), out)  # back to back: the next epoch, the same sums in the same order
    # decode: the same tokens on every rank (rank 0's), the plan local, the down projection all-reduced
    xr, idr, wr = (rand((t_loc, hidden), dtype, seed, w.device), _ids(t_loc, k, experts, seed + 10).to(w.device),
                   rand((t_loc, k), torch.float32, seed + 20, w.device).abs())
    plan_r = ops.moe_plan(idr, wr, experts)
    hr = _act(ops.moe_gemm(xr, w1, plan_r))
    out_r = ops.moe_ar(hr, w2, plan_r)
    ok &= torch.allclose(out_r.float(), ops.moe_ar_reference(plan_rows_to_pairs(hr, plan_r), w2, idr, wr), **tol)
    return bool(ok)


@pytest.mark.parametrize("method", ["copy_engine", "sm"])
def test_ag_moe_rs_ar_match_torch(world, method, seed):
    assert all(world.run(_tp_body, 5, 48, 24, 5, 2, torch.float32, seed, method))


def test_bf16_odd_world(world3, seed):
    assert all(world3.run(_tp_body, 3, 64, 40, 4, 3, torch.bfloat16, seed, "copy_engine"))


def _one_rank(seed):
    return _tp_body(7, 32, 16, 3, 2, torch.float32, seed, "copy_engine")


def test_one_rank(world1, seed):
    assert all(world1.run(_one_rank, seed))


def _moe_gemm_alone(seed):
    """moe_gemm with gather=False reads rows in plan order, and writes every row."""
    w = this_world()
    ids = _ids(6, 2, 4, seed).to(w.device)
    plan = ops.moe_plan(ids, torch.ones(6, 2, device=w.device), 4)
    rows = rand((12, 16), torch.float32, seed, w.device)
    wt = rand((4, 16, 8), torch.float32, seed + 1, w.device)
    got = ops.moe_gemm(rows, wt, plan, gather=False)
    expert = ids.reshape(-1)[plan.routing.sorted_slots.long()].long()
    want = torch.einsum("rk,rkn->rn", rows, wt[expert])
    return torch.allclose(got, want, atol=1e-5, rtol=1e-5) and not torch.isnan(got).any()


def test_moe_gemm_in_plan_order(world2, seed):
    assert all(world2.run(_moe_gemm_alone, seed))


def _bad(case):
    w = this_world()
    x = torch.ones((3, 16), device=w.device)
    w1 = torch.ones((4, 16, 8), device=w.device)
    ids = torch.zeros((3, 2), dtype=torch.int32, device=w.device)
    wts = torch.ones((3, 2), device=w.device)
    calls = {
        "method": lambda: ops.ag_moe(x, w1, ids, wts, method="ring"),
        "w1": lambda: ops.ag_moe(x, w1[:, :8], ids, wts),
        "ids": lambda: ops.ag_moe(x, w1, ids + 4, wts),
        "wts": lambda: ops.ag_moe(x, w1, ids, wts[:, :1]),
        "x": lambda: ops.ag_moe(x.t(), w1, ids, wts),
        "rs_plan": lambda: ops.moe_rs(torch.ones((6, 8), device=w.device), torch.ones((4, 8, 16), device=w.device),
                                      ops.moe_plan(ids, wts, 4)),
        "rs_h": lambda: ops.moe_rs(torch.ones((5, 8), device=w.device), torch.ones((4, 8, 16), device=w.device),
                                   ops.moe_plan(ids, wts, 4)),
    }
    if case == "ids" and w.device.type == "cuda":  # checked for CPU tensors only (on GPUs it would sync)
        return "topk_ids must be in [0, 4): not checked on the GPU"
    try:
        calls[case]()
    except (ValueError, TypeError) as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("method", "method must be"), ("w1", "w1 must be [E, H, N]"),
                                         ("ids", "topk_ids must be in [0, 4)"), ("wts", "topk_weights must be"),
                                         ("x", "contiguous [T_loc, H]"),
                                         ("rs_plan", "got a plan of 1 x 3 tokens"), ("rs_h", "h must be [plan rows = 6")])
def test_bad_input(world2, case, needle):
    assert all(needle in m for m in world2.run(_bad, case))

