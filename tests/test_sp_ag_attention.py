"""Sequence-parallel prefill attention (``ops.sp_ag_attention``) on the CPU world: each rank's output equals
attention of its queries (at their global positions) over the whole sequence, zig-zag or contiguous shards, causal
or not, packed sequences (an empty one included), GQA, lse, both gather methods."""
import pytest
import torch

from triton_dist import ops
from triton_dist.kernels.attention import sp_ag_attention as spa
from triton_dist.kernels.attention._common import attention_rows_reference

from _util import poison, rand, this_world


def _shards(lens_global, hq, hkv, d, dtype, seed, zigzag, device):
    """Whole sequences (the same on every rank) and this rank's shards of them, packed; cu_seqlens of the shards."""
    w = this_world()
    n, r = w.world_size, w.rank
    qs, ks, vs, whole = [], [], [], []
    for i, s in enumerate(lens_global):
        q = rand((s, hq, d), dtype, seed + 3 * i, device)
        k = rand((s, hkv, d), dtype, seed + 3 * i + 1, device)
        v = rand((s, hkv, d), dtype, seed + 3 * i + 2, device)
        whole.append((q, k, v))
        if zigzag:
            cut = [spa.zigzag_shard(x, r, n) for x in (q, k, v)]
        else:
            c = s // n
            cut = [x[r * c:(r + 1) * c] for x in (q, k, v)]
        qs.append(cut[0])
        ks.append(cut[1])
        vs.append(cut[2])
    loc = [s // n for s in lens_global]
    cu = torch.tensor([0] + loc, dtype=torch.int64).cumsum(0).to(torch.int32)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), cu, whole


def _truth(whole, zigzag, causal, scale):
    """fp32 attention of this rank's queries over each whole sequence, packed like the shards."""
    w = this_world()
    n, r = w.world_size, w.rank
    outs = []
    for q, k, v in whole:
        o, lse = attention_rows_reference(q, k, v, scale=scale, causal_offset=0 if causal else None)
        if zigzag:
            outs.append((spa.zigzag_shard(o, r, n), spa.zigzag_shard(lse, r, n)))
        else:
            c = q.shape[0] // n
            outs.append((o[r * c:(r + 1) * c], lse[r * c:(r + 1) * c]))
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])


def _body(lens_global, heads, d, dtype, zigzag, causal, method, seed):
    w = this_world()
    hq, hkv = heads
    q, k, v, cu, whole = _shards(lens_global, hq, hkv, d, dtype, seed, zigzag, w.device)
    scale = d ** -0.5
    out = poison(torch.empty_like(q))
    got, lse = ops.sp_ag_attention(q, k, v, causal=causal, zigzag=zigzag, cu_seqlens=cu, return_lse=True,
                                   method=method, out=out)
    truth, truth_lse = _truth(whole, zigzag, causal, scale)
    ref, ref_lse = ops.sp_ag_attention_reference(q, k, v, causal=causal, zigzag=zigzag, cu_seqlens=cu)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}.get(dtype, 1e-2)
    ok = got is out and torch.allclose(got.float(), truth, atol=tol, rtol=tol)
    ok &= torch.allclose(ref, truth, atol=1e-5, rtol=1e-5) and torch.allclose(ref_lse, truth_lse, atol=1e-5)
    ok &= torch.allclose(lse, truth_lse, atol=1e-4, rtol=1e-4)
    return bool(ok)


@pytest.mark.parametrize("zigzag,causal", [(True, True), (False, True), (True, False)],
                         ids=["zigzag_causal", "contiguous_causal", "zigzag_full"])
def test_sp_ag_attention_matches_whole_sequence(world, zigzag, causal, seed):
    lens = [2 * 4 * 10, 2 * 4 * 3]  # divisible by 2 * world for 2 and 4 ranks: chunks of 10 and 3 tokens (4 ranks)
    assert all(world.run(_body, lens, (4, 2), 64, torch.float32, zigzag, causal, "auto", seed))


def test_packed_sequences_with_an_empty_one_gqa_and_sm_method(world2, seed):
    assert all(world2.run(_body, [36, 0, 12], (8, 1), 64, torch.float32, True, True, "sm", seed))


def test_fp16_and_bf16(world2, seed):
    for dtype in (torch.float16, torch.bfloat16):
        assert all(world2.run(_body, [24], (4, 4), 64, dtype, True, True, "copy_engine", seed))


def _bad(case):
    w = this_world()
    dev = w.device
    q = torch.ones((6, 4, 64), device=dev)
    kv = torch.ones((6, 2, 64), device=dev)
    calls = {
        "odd": lambda: ops.sp_ag_attention(q[:5], kv[:5], kv[:5]),
        "tokens": lambda: ops.sp_ag_attention(q, kv[:4], kv[:4]),
        "heads": lambda: ops.sp_ag_attention(q, torch.ones((6, 3, 64), device=dev), torch.ones((6, 3, 64), device=dev)),
        "method": lambda: ops.sp_ag_attention(q, kv, kv, method="ring"),
        "cu": lambda: ops.sp_ag_attention(q, kv, kv, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
    }
    try:
        calls[case]()
    except (ValueError, TypeError) as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("odd", "must be even"), ("tokens", "the same tokens"),
                                         ("heads", "multiple of the kv heads"), ("method", "method must be"),
                                         ("cu", "prefix sums from 0 to q's 6")])
def test_bad_input(world2, case, needle):
    for msg in world2.run(_bad, case):
        assert needle in msg, msg


# ------------------------------------------------------------------------------------------------- GPU only
def _gpu_body(method, seed):
    w = this_world()
    return _body([2048, 512], (32, 8), 128, torch.bfloat16, True, True, method, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["copy_engine", "sm"])
def test_bf16_llama_heads_on_gpu(world2, method, seed):
    """bf16, 32 q / 8 kv heads of 128, two packed sequences (2048 and 512 tokens): both gather methods, TMA K/V."""
    assert all(world2.run(_gpu_body, method, seed, timeout=300))
