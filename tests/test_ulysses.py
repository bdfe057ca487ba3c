"""Ulysses all-to-alls (``kernels/attention/ulysses.py``) on the CPU world: exact against torch.distributed and
against slicing the global tensors, GQA head placement, and attention through pre -> local attention -> post equal
to attention over the whole sequence."""
import pytest
import torch

from triton_dist.kernels.attention import ulysses as U
from triton_dist.kernels.attention._common import attention_rows_reference

from _util import rand, this_world

HEADS = [(8, 8), (8, 4), (8, 2), (8, 1)]  # (Hq, Hkv): MHA, GQA 2/4, MQA; Hkv < W replicates kv heads


def _globals(s_loc, hq, hkv, d, dtype, seed, device, w):
    """The whole sequence's q / k / v (the same on every rank) and this rank's shard of it."""
    q = rand((w * s_loc, hq, d), dtype, seed, device)
    k = rand((w * s_loc, hkv, d), dtype, seed + 1, device)
    v = rand((w * s_loc, hkv, d), dtype, seed + 2, device)
    return q, k, v


def _pre_post(s_loc, hq, hkv, d, dtype, seed):
    w = this_world()
    n, r = w.world_size, w.rank
    if hq % n or (hkv >= n and hkv % n) or (hkv < n and n % hkv):
        return True  # not a valid split for this world (checked by the bad-input test)
    q, k, v = _globals(s_loc, hq, hkv, d, dtype, seed, w.device, n)
    mine = slice(r * s_loc, (r + 1) * s_loc)
    hq_r, hkv_r = hq // n, U.kv_heads_per_rank(hq, hkv, n)
    got = U.ulysses_pre_attn(q[mine], k[mine], v[mine])
    ref = U.ulysses_pre_attn_reference(q[mine], k[mine], v[mine])
    kv0 = r * hkv_r if hkv >= n else r // (n // hkv)  # the kv heads my q heads read
    truth = (q[:, r * hq_r:(r + 1) * hq_r], k[:, kv0:kv0 + hkv_r], v[:, kv0:kv0 + hkv_r])
    ok = all(torch.equal(a, b) and torch.equal(a, t) for a, b, t in zip(got, ref, truth))
    # every q head of mine reads the kv head the global GQA mapping gives it
    ok &= all((r * hq_r + i) // (hq // hkv) - kv0 in range(hkv_r) for i in range(hq_r))
    o = rand((n * s_loc, hq_r, d), dtype, seed + 3, w.device)
    back = U.ulysses_post_attn(o)
    ok &= torch.equal(back, U.ulysses_post_attn_reference(o)) and back.shape == (s_loc, hq, d)
    # pre -> attention on my heads over the whole sequence -> post == attention over the whole sequence, my tokens
    qh, kh, vh = got
    local, _ = attention_rows_reference(qh, kh, vh, scale=0.125, causal_offset=0)
    whole, _ = attention_rows_reference(q, k, v, scale=0.125, causal_offset=0)
    ok &= torch.allclose(U.ulysses_post_attn(local), whole[mine], atol=1e-5, rtol=1e-5)
    return bool(ok)


@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{a}_hkv{b}" for a, b in HEADS])
@pytest.mark.parametrize("s_loc", [1, 37])
def test_pre_and_post_attn(world, heads, s_loc, seed):
    assert all(world.run(_pre_post, s_loc, *heads, 16, torch.float32, seed))


def test_fp16_and_bf16(world2, seed):
    for dtype in (torch.float16, torch.bfloat16):
        assert all(world2.run(_pre_post, 5, 8, 2, 32, dtype, seed))


def _bad(case):
    w = this_world()
    dev = w.device
    q = torch.ones((4, 6, 16), device=dev)
    kv = torch.ones((4, 2, 16), device=dev)
    calls = {
        "hq": lambda: U.ulysses_pre_attn(torch.ones((4, 3, 16), device=dev), kv[:, :1], kv[:, :1]),
        "hkv": lambda: U.ulysses_pre_attn(torch.ones((4, 12, 16), device=dev), torch.ones((4, 3, 16), device=dev),
                                          torch.ones((4, 3, 16), device=dev)),
        "tokens": lambda: U.ulysses_pre_attn(q, kv[:3], kv[:3]),
        "dtype": lambda: U.ulysses_pre_attn(q, kv.half(), kv.half()),
        "post": lambda: U.ulysses_post_attn(torch.ones((3, 2, 16), device=dev)),
    }
    try:
        calls[case]()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("hq", "do not split"), ("hkv", "multiple of the world size, or divide"),
                                         ("tokens", "q's tokens"), ("dtype", "must be one of torch.float32"),
                                         ("post", "not a multiple of the world size")])
def test_bad_input(world2, case, needle):
    for msg in world2.run(_bad, case):
        assert needle in msg, msg


# ------------------------------------------------------------------------------------------------ fused forms
def _fused(s_loc, hq, hkv, d, hidden, chunks, dtype, seed):
    w = this_world()
    n, r = w.world_size, w.rank
    x = rand((s_loc, hidden), dtype, seed + r, w.device)  # this rank's tokens
    w_qkv = rand(((hq + 2 * hkv) * d, hidden), dtype, seed + 100, w.device) / hidden  # the same weight everywhere
    w_o = rand((hidden, hq * d), dtype, seed + 200, w.device) / (hq * d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    got = U.ulysses_qkv_pre_attn(x, w_qkv, num_heads=hq, num_kv_heads=hkv, chunks=chunks)
    ref = U.ulysses_qkv_pre_attn_reference(x, w_qkv, num_heads=hq, num_kv_heads=hkv)
    ok = all(a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(got, ref))
    o = rand((n * s_loc, hq // n, d), dtype, seed + 300 + r, w.device)
    out = U.ulysses_post_attn_o(o, w_o, chunks=chunks)
    want = U.ulysses_post_attn_o_reference(o, w_o)
    ok &= out.shape == (s_loc, hidden) and torch.allclose(out.float(), want.float(), atol=tol, rtol=tol)
    return bool(ok)


@pytest.mark.parametrize("chunks", [1, 3, 64], ids=["one_group", "three_groups", "more_groups_than_tokens"])
def test_fused_projections_match_the_unfused_path(world, chunks, seed):
    assert all(world.run(_fused, 7, 8, 2, 16, 24, chunks, torch.float32, seed))


def test_fused_projections_bf16_and_mqa(world2, seed):
    assert all(world2.run(_fused, 5, 4, 1, 32, 16, 2, torch.bfloat16, seed))


def _fused_bad(case):
    dev = this_world().device
    x = torch.ones((4, 24), device=dev)
    calls = {
        "rows": lambda: U.ulysses_qkv_pre_attn(x, torch.ones((7, 24), device=dev), num_heads=4, num_kv_heads=2),
        "chunks": lambda: U.ulysses_qkv_pre_attn(x, torch.ones((16, 24), device=dev), num_heads=4, num_kv_heads=2,
                                                 chunks=0),
        "w_o": lambda: U.ulysses_post_attn_o(torch.ones((4, 2, 8), device=dev), torch.ones((5, 7), device=dev)),
    }
    try:
        calls[case]()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("rows", "expected [(Hq + 2 Hkv) * D, hidden]"),
                                         ("chunks", "chunks must be an int >= 1"),
                                         ("w_o", "expected [hidden, Hq * D]")])
def test_fused_bad_input(world2, case, needle):
    for msg in world2.run(_fused_bad, case):
        assert needle in msg, msg
