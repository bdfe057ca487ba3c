"""The decoder layer's fused kernels (kernels/decoder.py) against their torch references: random data, odd sizes,
poisoned outputs and caches; the cache writes exact, the arithmetic to the references' rounding (fp32 / fp16 on the
CPU world; bf16 on GPUs)."""
import pytest
import torch

from triton_dist.kernels import decoder as K
from triton_dist.layers.norm import rope_inv_freq

from _util import poison, rand
from conftest import BACKEND

DEVICE = "cpu" if BACKEND == "cpu" else "cuda"  # the GPU suite runs the same tests on its GPU

DT = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("with_res", [False, True])
def test_add_rmsnorm(dtype, with_res):
    x, r = rand((5, 72), dtype, 1, DEVICE), rand((5, 72), dtype, 2, DEVICE)
    w = rand((72,), dtype, 3, DEVICE)
    out, s = K.add_rmsnorm(x, w, 1e-6, r if with_res else None)
    ref, ref_s = K.add_rmsnorm_reference(x, w, 1e-6, r if with_res else None)
    assert torch.equal(s, ref_s)  # the add rounds once in both
    torch.testing.assert_close(out, ref, **_tol(dtype))
    with pytest.raises(ValueError, match="residual must be"):
        K.add_rmsnorm(x, w, 1e-6, r[:4])


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("paged,norm,prefill", [(False, True, False), (True, True, True), (False, False, True),
                                                (True, False, False)])
def test_qk_norm_rope_cache(dtype, paged, norm, prefill):
    b, s, hq, hkv, d, max_len, page = 3, 4 if prefill else 1, 4, 2, 64, 16, 4
    t = b * s
    qkv = rand((t, (hq + 2 * hkv) * d), dtype, 5, DEVICE)
    pos = (torch.arange(s)[None] + torch.tensor([0, 3, 9])[:, None]).to(DEVICE)
    inv = rope_inv_freq(d, 10000.0).to(DEVICE)
    qn, kn = (rand((d,), dtype, 6, DEVICE), rand((d,), dtype, 7, DEVICE)) if norm else (None, None)
    bt = torch.tensor([[2, 0, 5, 7], [1, 3, 4, 6], [8, 9, 10, 11]], dtype=torch.int32, device=DEVICE) if paged else None
    shape = (12, page, hkv, d) if paged else (b, max_len, hkv, d)
    caches = [poison(torch.empty(shape, dtype=dtype, device=DEVICE)) for _ in range(4)]
    kw = dict(num_heads=hq, num_kv_heads=hkv, seq=s, q_norm=qn, k_norm=kn, block_table=bt, return_kv=prefill)
    got = K.qk_norm_rope_cache(qkv, pos, inv, caches[0], caches[1], **kw)
    want = K.qk_norm_rope_cache_reference(qkv, pos, inv, caches[2], caches[3], **kw)
    for g, w_ in zip(got if prefill else (got,), want if prefill else (want,)):
        torch.testing.assert_close(g, w_, **_tol(dtype))
    torch.testing.assert_close(caches[0], caches[2], **_tol(dtype), equal_nan=True)  # poison where nothing went
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())  # v: moved, exact
    assert torch.isnan(caches[1]).any()  # untouched slots kept their poison


def test_qk_norm_rope_cache_bad_input():
    qkv = rand((2, 8 * 64), torch.float32, 1, DEVICE)
    c = torch.zeros((2, 8, 2, 64), device=DEVICE)
    inv = rope_inv_freq(64, 1e4).to(DEVICE)
    pos = torch.zeros((2, 1), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv must be \[T, \(4 \+ 2 \* 1\) \* 64\]"):
        K.qk_norm_rope_cache(qkv, pos, inv, c[:, :, :1].contiguous(), c[:, :, :1].contiguous(), num_heads=4,
                             num_kv_heads=1, seq=1)
    with pytest.raises(ValueError, match="both q_norm and k_norm"):
        K.qk_norm_rope_cache(qkv, pos, inv, c, c, num_heads=4, num_kv_heads=2, seq=1, q_norm=inv)


@pytest.mark.parametrize("dtype", DT)
def test_silu_mul(dtype):
    x = rand((3, 2 * 200), dtype, 9, DEVICE)
    torch.testing.assert_close(K.silu_mul(x), K.silu_mul_reference(x), **_tol(dtype))
    with pytest.raises(ValueError, match=r"x must be \[T, 2 \* I\]"):
        K.silu_mul(x[:, :7])
