"""The ops registered with torch.library (``triton_dist/library.py``): each registered op against the direct call
of :mod:`triton_dist.ops`, ``torch.library.opcheck`` (schema, fake tensors, AOT dispatch with dynamic shapes) on
the local ops in this process and on the collectives in a world, and a tensor-parallel layer under ``torch.compile``
(``fullgraph=True``: no graph break) against eager, with ``aot_eager`` and, where a C compiler exists, ``inductor``."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import triton_dist.library as library
from triton_dist import ops
from triton_dist.kernels import decode_gemm as dg

from _util import rand, this_world
from conftest import BACKEND

DEVICE = "cpu" if BACKEND == "cpu" else "cuda"
td = torch.ops.triton_dist
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))  # inductor's CPU code is C++
OPCHECK_OK = {"test_schema": "SUCCESS", "test_autograd_registration": "SUCCESS", "test_faketensor": "SUCCESS",
              "test_aot_dispatch_dynamic": "SUCCESS"}


def _opcheck(op, args, kwargs=None):
    assert torch.library.opcheck(op, args, kwargs) == OPCHECK_OK


# ------------------------------------------------------------------------------------------------ registration
def _normalised(schema: str) -> str:
    """A schema as the docstring writes it: alias sets of mutated arguments as ``(a!)``, ``SymInt`` as ``int``
    (torch versions print them differently)."""
    return re.sub(r"Tensor\(a\d*!\)", "Tensor(a!)", " ".join(schema.split())).replace("SymInt", "int")


def test_every_op_is_registered_with_its_documented_schema():
    doc = _normalised(library.__doc__)  # long schemas are wrapped there
    for name in library.__all__:
        schema = str(getattr(td, name).default._schema)
        assert schema.startswith(f"triton_dist::{name}(") and _normalised(schema) in doc, schema
        # functional, but for the cache writes of qk_norm_rope_cache (declared)
        assert getattr(td, name).default._schema.is_mutable == (name == "qk_norm_rope_cache"), name


def test_import_registers_and_does_nothing_else():
    """``import triton_dist`` leaves the ops unregistered; ``import triton_dist.library`` makes no world."""
    code = ("import sys, torch, triton_dist\n"
            "assert 'triton_dist.library' not in sys.modules and not hasattr(torch.ops.triton_dist, 'all_reduce')\n"
            "import triton_dist.library\n"
            "from triton_dist import ops\n"
            "assert torch.ops.triton_dist.all_reduce is not None and not triton_dist.is_initialized()\n"
            "assert not ops._contexts\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TRITON_INTERPRET="1"))


# ------------------------------------------------------------------------------------------------ local ops
def _attn_inputs(seed, device=DEVICE):
    q = rand((2, 5, 4, 64), torch.float32, seed, device)
    k = rand((2, 7, 2, 64), torch.float32, seed + 1, device)
    v = rand((2, 7, 2, 64), torch.float32, seed + 2, device)
    return q, k, v


def _decode_inputs(seed, device=DEVICE, page=4):
    """q [2, 4, 64] and a 2-kv-head cache of lengths 9 and 4, contiguous and paged (pages in a shuffled order)."""
    q = rand((2, 4, 64), torch.float32, seed, device)
    k = rand((2, 9, 2, 64), torch.float32, seed + 1, device)
    v = rand((2, 9, 2, 64), torch.float32, seed + 2, device)
    lens = torch.tensor([9, 4], dtype=torch.int32, device=device)
    per_seq = -(-9 // page)
    order = torch.randperm(2 * per_seq, generator=torch.Generator().manual_seed(seed)).to(device)
    kp, vp = (torch.empty((2 * per_seq, page, 2, 64), device=device) for _ in range(2))
    for src, dst in ((k, kp), (v, vp)):  # page p of sequence b at slot order[b * per_seq + p]
        dst[order] = F.pad(src, (0, 0, 0, 0, 0, per_seq * page - 9)).reshape(2 * per_seq, page, 2, 64)
    table = order.reshape(2, per_seq).to(torch.int32)
    return q, (k, v), (kp, vp, table), lens


def test_local_ops_match_the_direct_calls(seed):
    q, k, v = _attn_inputs(seed)
    for causal, scale, softcap in ((False, None, 0.0), (True, 0.3, 5.0)):
        torch.testing.assert_close(td.flash_attn(q, k, v, causal=causal, scale=scale, softcap=softcap),
                                   ops.flash_attn(q, k, v, causal=causal, scale=scale, softcap=softcap))
    qd, (kc, vc), (kp, vp, table), lens = _decode_inputs(seed)
    torch.testing.assert_close(td.flash_decode(qd, kc, vc, lens, scale=0.2), ops.flash_decode(qd, kc, vc, lens,
                                                                                             scale=0.2))
    torch.testing.assert_close(td.flash_decode(qd, kp, vp, lens, block_table=table, softcap=3.0),
                               ops.flash_decode(qd, kp, vp, lens, block_table=table, softcap=3.0))
    a = rand((3, 40), torch.float32, seed, DEVICE)
    b = rand((24, 40), torch.float32, seed + 1, DEVICE).t()  # an nn.Linear weight's w.t()
    torch.testing.assert_close(td.decode_gemm(a, b), dg.decode_gemm(a, b))
    torch.testing.assert_close(td.decode_gemm(a.t().contiguous().t(), b), dg.decode_gemm(a, b))  # any layout of a


def test_opcheck_local_ops(seed):
    q, k, v = _attn_inputs(seed)
    _opcheck(td.flash_attn.default, (q, k, v), {"causal": True, "scale": 0.3})
    qd, (kc, vc), (kp, vp, table), lens = _decode_inputs(seed)
    _opcheck(td.flash_decode.default, (qd, kc, vc, lens))
    _opcheck(td.flash_decode.default, (qd, kp, vp, lens, table), {"softcap": 4.0})
    _opcheck(td.decode_gemm.default, (rand((3, 40), torch.float32, seed, DEVICE),
                                      rand((40, 24), torch.float32, seed + 1, DEVICE)))


def test_bad_input_is_named_by_the_op():
    a = torch.ones((3, 40), device=DEVICE)
    with pytest.raises(ValueError, match="decode_gemm: a is"):
        td.decode_gemm(a, torch.ones((41, 8), device=DEVICE))
    with pytest.raises(ValueError, match="decode_gemm: expected a"):  # the fake implementation's check
        with torch._subclasses.FakeTensorMode() as mode:
            td.decode_gemm(mode.from_tensor(a), mode.from_tensor(torch.ones((41, 8), device=DEVICE)))


def test_backward_raises_and_no_grad_compiles(seed):
    """No autograd formula: backward raises; weights that require grad (nn.Parameter) compile under no_grad."""
    a = rand((3, 40), torch.float32, seed, DEVICE)
    b = torch.nn.Parameter(rand((40, 24), torch.float32, seed + 1, DEVICE))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        td.decode_gemm(a, b).sum().backward()
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: td.decode_gemm(a, b) * 2, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(fn(a, b), dg.decode_gemm(a, b) * 2)


# ------------------------------------------------------------------------------------------------ in a world
def _collectives_and_gemms(seed):
    w = this_world()
    n = w.world_size
    x = rand((3, 37), torch.float32, seed + w.rank, w.device)
    assert torch.equal(td.all_gather(x), ops.all_gather(x))  # data movement: exact
    assert torch.equal(td.all_gather(x, method="push"), ops.all_gather(x, method="push"))
    torch.testing.assert_close(td.all_reduce(x), ops.all_reduce(x))
    torch.testing.assert_close(td.all_reduce(x.t()), ops.all_reduce(x.t().contiguous()))  # any layout of x
    xs = rand((2 * n, 5, 3), torch.float16, seed + 10 + w.rank, w.device)
    torch.testing.assert_close(td.reduce_scatter(xs), ops.reduce_scatter(xs))
    a = rand((3 * n, 24), torch.float32, seed + 20 + w.rank, w.device)
    b = rand((20, 24), torch.float32, seed + 30 + w.rank, w.device).t()
    for name in ("ag_gemm", "gemm_rs", "gemm_ar"):
        got, want = getattr(td, name)(a, b), getattr(ops, name)(a, b)
        assert got.shape == want.shape == ((n * a.shape[0], 20) if name == "ag_gemm" else
                                           (a.shape[0] // n, 20) if name == "gemm_rs" else (a.shape[0], 20)), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="method must be"):  # the method travels through the schema
        td.all_reduce(x, method="nope")
    ops.release_contexts()  # the session's world is shared with other tests: leave its heap empty
    return True


def test_collectives_and_gemms_match_the_direct_calls(world2, seed):
    assert all(world2.run(_collectives_and_gemms, seed))


def _moe_inputs(seed, t, hidden=32, inter=8, experts=4, k=2):
    w = this_world()
    x = rand((t, hidden), torch.float32, seed, w.device)
    ids = torch.randint(0, experts, (t, k), generator=torch.Generator().manual_seed(seed + 1)).to(w.device)
    wts = rand((t, k), torch.float32, seed + 2, w.device).abs()
    w1 = rand((experts, 2 * inter, hidden), torch.float32, seed + 3 + w.rank, w.device).transpose(1, 2) * 0.1
    w2 = rand((experts, inter, hidden), torch.float32, seed + 4 + w.rank, w.device) * 0.1
    return x, w1, w2, ids, wts


def _silu_mul(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _opcheck_collectives(seed):
    """opcheck calls each op several times (eager, under fake tensors, AOT-compiled with dynamic shapes): collective
    calls all the same, in the same order, on every rank, as any collective needs."""
    w = this_world()
    x = rand((4, 6), torch.float32, seed + w.rank, w.device)
    for op in (td.all_reduce, td.all_gather, td.reduce_scatter):
        _opcheck(op.default, (x,))
    b = rand((6, 8), torch.float32, seed + 10 + w.rank, w.device)
    for op in (td.ag_gemm, td.gemm_rs, td.gemm_ar):
        _opcheck(op.default, (x, b))
    _opcheck(td.tp_moe_ag_rs.default, _moe_inputs(seed + 100 * w.rank, 3))
    _opcheck(td.tp_moe_ar.default, _moe_inputs(seed, 2))
    ops.release_contexts()
    return True


def test_opcheck_collectives(world2, seed):
    assert all(world2.run(_opcheck_collectives, seed))


def _moe(seed):
    w = this_world()
    x, w1, w2, ids, wts = _moe_inputs(seed + 100 * w.rank, 3)  # sequence-sharded: each rank its own tokens
    h, plan = ops.ag_moe(x, w1, ids, wts)
    got = td.tp_moe_ag_rs(x, w1, w2, ids, wts)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ops.moe_rs(_silu_mul(h), w2, plan), rtol=1e-5, atol=1e-5)
    x, w1, w2, ids, wts = _moe_inputs(seed, 4)  # replicated tokens (decode)
    plan = ops.moe_plan(ids, wts, 4)
    got = td.tp_moe_ar(x, w1, w2, ids, wts)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ops.moe_ar(_silu_mul(ops.moe_gemm(x, w1, plan)), w2, plan), rtol=1e-5,
                               atol=1e-5)
    ops.release_contexts()
    return True


def test_moe_ops_match_the_direct_calls(world2, seed):
    assert all(world2.run(_moe, seed))


# ------------------------------------------------------------------------------------------------ torch.compile
def _tp_layer(x, w_up, w_down, ag_gemm, gemm_rs, all_reduce):
    """A sequence-parallel MLP block: column-parallel up projection over the gathered tokens, row-parallel down
    projection reduce-scattered back to this rank's tokens, then a residual and an RMS over every rank's tokens."""
    h = F.silu(ag_gemm(x, w_up))  # (W*m, F/W)
    y = gemm_rs(h, w_down) + x  # (m, H)
    ms = all_reduce(y.square().sum(0, keepdim=True)) / h.shape[0]  # (1, H)
    return y * torch.rsqrt(ms + 1e-6)


def _registered_layer(x, w_up, w_down):
    return _tp_layer(x, w_up, w_down, td.ag_gemm, td.gemm_rs, td.all_reduce)


def _compiled(backend, seed, rows):
    """The layer compiled (fullgraph) against the direct calls, eagerly, for each token count in ``rows`` (a second
    one recompiles with a dynamic token dimension: the fake implementations' world size times a symbolic size)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    inductor_config.compile_threads = 1  # no pool of compile workers to start (and stop) in each rank
    w = this_world()
    hidden, ffn = 16, 24
    w_up = torch.nn.Parameter(rand((hidden, ffn), torch.float32, seed + 1 + w.rank, w.device) * 0.3)
    w_down = torch.nn.Parameter(rand((ffn, hidden), torch.float32, seed + 2 + w.rank, w.device) * 0.3)
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(_registered_layer, fullgraph=True, backend=counter)
    for call, m in enumerate(rows):
        x = rand((m, hidden), torch.float32, seed + 10 * call + w.rank, w.device)
        with torch.no_grad():  # inference: no autograd formulas (library docstring)
            want = _tp_layer(x, w_up, w_down, ops.ag_gemm, ops.gemm_rs, ops.all_reduce)
            torch.testing.assert_close(fn(x, w_up, w_down), want, rtol=1e-5, atol=1e-5)
    targets = {str(n.target).removesuffix(".default") for g in counter.graphs for n in g.graph.nodes}
    assert {"triton_dist.ag_gemm", "triton_dist.gemm_rs", "triton_dist.all_reduce"} <= targets, targets
    ops.release_contexts()
    return counter.frame_count


def test_tp_layer_compiles_fullgraph_aot_eager(world2, seed):
    assert all(n >= 1 for n in world2.run(_compiled, "aot_eager", seed, (4, 6)))


@pytest.mark.skipif(not HAVE_CC, reason="inductor's CPU backend compiles C++: no cc, gcc or clang on this machine "
                                        "(the aot_eager test covers tracing through the ops)")
def test_tp_layer_compiles_fullgraph_inductor(world2, seed):
    assert all(n >= 1 for n in world2.run(_compiled, "inductor", seed, (5,), timeout=300))
