"""Fuzz: seeded random sequences of ops, shapes, dtypes and methods, some calls deliberately different on one rank.
Every call either matches its torch reference or fails loudly on every rank involved; nothing returns garbage and
nothing hangs (each world runs under a deadline). Two flavours: with TRITON_DIST_DEBUG=1 the host check names every
difference before anything is launched (CallMismatch on every rank; the GPU suite runs it on CUDA and shared-GPU
worlds too); without it (CPU world) only the always-on checks act: the device-side call signatures and headers
(CallMismatch), the named barriers of context steps (CallMismatch), and, where two ranks' protocols never meet, the
LL side's check for a peer in a staged call (CallMismatch) and labelled timeouts on the other side (SignalTimeout
naming the op and the rank that did not arrive)."""
import pytest
import torch
import torch.distributed as dist

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
    """Make one random call of ``op`` (``differ``: this rank's call deliberately differs). Returns a function that
    checks the result against its torch reference (a collective: call it only when every rank's call returned)."""
    r = int(torch.randint(1, 40, (1,), generator=g))
    method = METHODS.get(op, ("auto",))[int(torch.randint(0, len(METHODS.get(op, ("auto",))), (1,), generator=g))]
    seed = int(torch.randint(0, 1 << 30, (1,), generator=g))
    rows = r + (1 if differ else 0)
    rtol, atol = TOL[dtype]
    if op == "all_reduce":
        x = rand((rows, 3), dtype, seed + w.rank, w.device)
        if method == "ll" and x.numel() % 2:
            method = "auto"
        got = ops.all_reduce(x, method=method)
        return lambda: torch.testing.assert_close(got, ar.all_reduce_reference(x), rtol=rtol, atol=atol)
    if op == "all_gather":
        x = rand((rows, 5), dtype, seed + w.rank, w.device)
        if method == "ll" and x.numel() * x.element_size() % 4:  # LL moves 32-bit words
            method = "auto"
        got = ops.all_gather(x, method=method)
        return lambda: torch.equal(got, ag.all_gather_reference(x)) or _fail("all_gather differs")
    if op == "reduce_scatter":
        x = rand((w.world_size * rows, 2), dtype, seed + w.rank, w.device)
        got = ops.reduce_scatter(x, method=method)
        return lambda: torch.testing.assert_close(got, rs.reduce_scatter_reference(x), rtol=rtol, atol=atol)
    if op == "all_to_all":
        x = rand((w.world_size * rows, 3), dtype, seed + w.rank, w.device)
        got = ops.all_to_all(x, method=method)
        return lambda: torch.equal(got, a2a.all_to_all_reference(x)) or _fail("all_to_all differs")
    if op == "all_to_all_v":
        gs = torch.Generator().manual_seed(seed)
        counts = torch.randint(0, 5, (w.world_size, w.world_size), generator=gs).tolist()
        ins, outs = counts[w.rank], [counts[s][w.rank] for s in range(w.world_size)]
        if differ:
            outs[0] += 1
        x = rand((sum(ins), 4), dtype, seed + w.rank, w.device)
        got = ops.all_to_all_v(x, ins, outs)
        return lambda: torch.equal(got, a2a.all_to_all_v_reference(x, ins, outs)) or _fail("all_to_all_v differs")
    if op == "ag_gemm":
        a = rand((rows, 16), dtype, seed + w.rank, w.device)
        b = rand((16, 8), dtype, seed + 99, w.device)
        got = ops.ag_gemm(a, b)
        return lambda: _close(got, agm.ag_gemm_reference(a, b), rtol, atol)
    a = rand((w.world_size * rows, 16), dtype, seed + w.rank, w.device)  # gemm_rs
    b = rand((16, 8), dtype, seed + 99 + w.rank, w.device)
    got = ops.gemm_rs(a, b)
    return lambda: _close(got, grs.gemm_rs_reference(a, b), rtol, atol)


def _fail(what):
    raise AssertionError(what)


def _close(got, ref, rtol, atol):
    torch.testing.assert_close(got, ref, rtol=5 * rtol, atol=5 * atol * ref.abs().max().item())


NAMES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_v", "ag_gemm", "gemm_rs")


def _draw(g, w):
    op = NAMES[int(torch.randint(0, len(NAMES), (1,), generator=g))]
    dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
    odd_rank = int(torch.randint(0, w.world_size, (1,), generator=g))
    deliberate = bool(torch.rand((1,), generator=g) < 0.2)
    return op, dtype, odd_rank, deliberate


def _fuzz(calls, seed):
    """TRITON_DIST_DEBUG=1: every deliberate difference is caught before launch, on every rank."""
    w = this_world()
    g = torch.Generator().manual_seed(seed)  # the same sequence on every rank
    outcomes = []
    for i in range(calls):
        op, dtype, odd_rank, deliberate = _draw(g, w)
        try:
            _one_call(op, g, w, dtype, deliberate and w.rank == odd_rank)()
            outcome = "ok"
        except triton_dist.CallMismatch:
            outcome = "mismatch"
        outcomes.append((i, op, deliberate, outcome))
    ops.release_contexts()
    return outcomes


def _fuzz_device_checks_only(calls, seed):
    """No TRITON_DIST_DEBUG: only the device-side checks, the heap labels and the named barriers. Every call either
    matches its reference or raises CallMismatch or a SignalTimeout that says what the signal is; a world whose call
    failed is re-made (finalize + init), as the docs say."""
    w = this_world()
    g = torch.Generator().manual_seed(seed)
    outcomes = []
    for i in range(calls):
        op, dtype, odd_rank, deliberate = _draw(g, w)
        check, outcome = None, ("ok", "")
        try:
            check = _one_call(op, g, w, dtype, deliberate and w.rank == odd_rank)
            triton_dist.synchronize()
        except (triton_dist.CallMismatch, triton_dist.SignalTimeout) as err:
            outcome = (type(err).__name__, str(err))
        every = [None] * w.world_size
        dist.all_gather_object(every, outcome[0], group=w.group)
        if all(k == "ok" for k in every):
            if not deliberate:
                check()
            else:  # a deliberate difference nobody noticed: the result is garbage
                outcome = ("silent", "")
        else:
            triton_dist.finalize()
            w = triton_dist.init()
        outcomes.append((i, op, deliberate, odd_rank, outcome))
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


@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks,calls", [(2, 40), (3, 25)])
def test_random_ops_without_debug_match_or_fail_loudly(ranks, calls, seed):
    from conftest import BACKEND
    if BACKEND != "cpu":
        pytest.skip("a device-side mismatch traps on GPUs (the CUDA context ends): the GPU run uses the debug fuzz")
    with new_world(ranks, env={"TRITON_DIST_WAIT_TIMEOUT_S": "2"}) as w:
        per_rank = w.run(_fuzz_device_checks_only, calls, seed, timeout=360)
    deliberate_seen = 0
    for row in zip(*per_rank):
        i, op, deliberate, odd = row[0][:4]
        kinds = [o[4][0] for o in row]
        if not deliberate:
            assert kinds == ["ok"] * ranks, (i, op, kinds, [o[4][1][:300] for o in row])
            continue
        deliberate_seen += 1
        # the odd rank and its peers stop; in all_to_all_v only rank 0 (whose split to the odd rank is off) must
        assert "silent" not in kinds and "ok" not in (kinds[odd], kinds[0]), (i, op, kinds)
        if op != "all_to_all_v":
            assert "ok" not in kinds, (i, op, kinds)
        for kind, (_, msg) in ((o[4][0], o[4]) for o in row):
            if kind == "SignalTimeout":
                assert "That signal is" in msg, msg  # a labelled signal: the message names the op and the rank
    assert deliberate_seen
