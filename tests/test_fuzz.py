"""Fuzz: seeded random sequences of ops, shapes, dtypes and methods, some calls deliberately different on one rank.
Every call either matches its torch reference or raises CallMismatch on every rank involved; nothing returns garbage
and nothing hangs (each world runs under a deadline). CPU world by default (TRITON_DIST_DEBUG=1, so the host check
names call mismatches before anything is launched); the GPU suite runs the same file on CUDA and shared-GPU worlds."""
import pytest
import torch

import triton_dist
from triton_dist import ops
from triton_dist.kernels import all_gather as ag
from triton_dist.kernels import all_reduce as ar
from triton_dist.kernels import all_to_all as a2a
from triton_dist.kernels import reduce_scatter as rs
from triton_dist.kernels import ag_gemm as agm
from triton_dist.kernels import gemm_rs as grs

from _util import rand, this_world
from conftest import new_world

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
METHODS = {"all_reduce": ("auto", "one_shot", "two_shot", "push_one_shot", "push_two_shot", "ll"),
           "all_gather": ("auto", "pull", "push", "ring", "ll"),
           "reduce_scatter": ("auto", "full_mesh", "push", "ring"), "all_to_all": ("auto", "kernel")}


def _one_call(op, g, w, dtype, differ):
    """Run one random call of ``op``; ``differ``: this rank's call deliberately differs. Returns 'ok' or 'mismatch'."""
    r = int(torch.randint(1, 40, (1,), generator=g))
    method = METHODS.get(op, ("auto",))[int(torch.randint(0, len(METHODS.get(op, ("auto",))), (1,), generator=g))]
    seed = int(torch.randint(0, 1 << 30, (1,), generator=g))
    rows = r + (1 if differ else 0)
    rtol, atol = TOL[dtype]
    try:
        if op == "all_reduce":
            x = rand((rows, 3), dtype, seed + w.rank, w.device)
            if method == "ll" and x.numel() % 2:
                method = "auto"
            torch.testing.assert_close(ops.all_reduce(x, method=method), ar.all_reduce_reference(x), rtol=rtol,
                                       atol=atol)
        elif op == "all_gather":
            x = rand((rows, 5), dtype, seed + w.rank, w.device)
            if method == "ll" and x.numel() * x.element_size() % 4:  # LL moves 32-bit words
                method = "auto"
            assert torch.equal(ops.all_gather(x, method=method), ag.all_gather_reference(x))
        elif op == "reduce_scatter":
            x = rand((w.world_size * rows, 2), dtype, seed + w.rank, w.device)
            torch.testing.assert_close(ops.reduce_scatter(x, method=method), rs.reduce_scatter_reference(x),
                                       rtol=rtol, atol=atol)
        elif op == "all_to_all":
            x = rand((w.world_size * rows, 3), dtype, seed + w.rank, w.device)
            assert torch.equal(ops.all_to_all(x, method=method), a2a.all_to_all_reference(x))
        elif op == "all_to_all_v":
            gs = torch.Generator().manual_seed(seed)
            counts = torch.randint(0, 5, (w.world_size, w.world_size), generator=gs).tolist()
            ins, outs = counts[w.rank], [counts[s][w.rank] for s in range(w.world_size)]
            if differ:
                outs[0] += 1
            x = rand((sum(ins), 4), dtype, seed + w.rank, w.device)
            assert torch.equal(ops.all_to_all_v(x, ins, outs), a2a.all_to_all_v_reference(x, ins, outs))
        elif op == "ag_gemm":
            a = rand((rows, 16), dtype, seed + w.rank, w.device)
            b = rand((16, 8), dtype, seed + 99, w.device)
            got = ops.ag_gemm(a, b)  # first: a deliberate difference must raise before any reference collective
            ref = agm.ag_gemm_reference(a, b)
            torch.testing.assert_close(got, ref, rtol=5 * rtol, atol=5 * atol * ref.abs().max().item())
        else:  # gemm_rs
            a = rand((w.world_size * rows, 16), dtype, seed + w.rank, w.device)
            b = rand((16, 8), dtype, seed + 99 + w.rank, w.device)
            got = ops.gemm_rs(a, b)
            ref = grs.gemm_rs_reference(a, b)
            torch.testing.assert_close(got, ref, rtol=5 * rtol, atol=5 * atol * ref.abs().max().item())
    except triton_dist.CallMismatch:
        return "mismatch"
    return "ok"


def _fuzz(calls, seed):
    w = this_world()
    g = torch.Generator().manual_seed(seed)  # the same sequence on every rank
    outcomes = []
    names = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_v", "ag_gemm", "gemm_rs")
    for i in range(calls):
        op = names[int(torch.randint(0, len(names), (1,), generator=g))]
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
        odd_rank = int(torch.randint(0, w.world_size, (1,), generator=g))
        deliberate = bool(torch.rand((1,), generator=g) < 0.2)
        outcomes.append((i, op, deliberate, _one_call(op, g, w, dtype, deliberate and w.rank == odd_rank)))
    ops.release_contexts()
    return outcomes


@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks,calls", [(2, 80), (3, 50), (4, 30)])
def test_random_ops_match_or_raise_mismatch(ranks, calls, seed):
    with new_world(ranks, env={"TRITON_DIST_DEBUG": "1"}) as w:
        per_rank = w.run(_fuzz, calls, seed, timeout=360)
    for r in range(1, ranks):
        assert [o[:3] for o in per_rank[r]] == [o[:3] for o in per_rank[0]], "ranks ran the same sequence"
    for i, op, deliberate, _ in per_rank[0]:
        got = {per_rank[r][i][3] for r in range(ranks)}
        # a deliberate difference is caught on every rank (CallMismatch), an honest call matches its reference
        assert got == ({"mismatch"} if deliberate else {"ok"}), (i, op, deliberate, got)
    assert any(o[2] for o in per_rank[0]) and not all(o[2] for o in per_rank[0])
