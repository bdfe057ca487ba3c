"""bf16 kernels give torch's answers in the CPU world (triton_dist.language._interp_mend mends Triton's interpreter),
and the same on GPUs (TRITON_DIST_TEST_BACKEND=cuda, where nothing is mended). Single process: no world needed."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from triton_dist.language import _interp_mend

DEVICE = "cpu" if os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu") == "cpu" else "cuda"


@pytest.fixture(autouse=True, scope="module")
def mended():
    _interp_mend.install()


def test_conversions_round_to_nearest_even():
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(4099, generator=g) * 1000, torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                        3.4e38, 1e-40, -1e-40])])
    bits = _interp_mend.f32_to_bf16(x.numpy())
    assert np.array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    back = _interp_mend.bf16_to_f32(bits)
    assert np.array_equal(back, x.to(torch.bfloat16).float().numpy())
    assert np.isnan(_interp_mend.bf16_to_f32(_interp_mend.f32_to_bf16(np.array([np.nan], np.float32)))).all()


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, i_ptr, add_ptr, mul_ptr, sub_ptr, max_ptr, lt_ptr, fma_ptr, cast_ptr,
                        icast_ptr, scaled_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    tl.store(add_ptr + offs, x + y)
    tl.store(mul_ptr + offs, x * y)
    tl.store(sub_ptr + offs, x - y)
    tl.store(max_ptr + offs, tl.maximum(x, y))
    tl.store(lt_ptr + offs, (x < y).to(tl.int32))
    tl.store(fma_ptr + offs, tl.fma(x, y, x))
    tl.store(cast_ptr + offs, (x.to(tl.float32) * 3.0).to(tl.bfloat16))
    tl.store(icast_ptr + offs, tl.load(i_ptr + offs).to(tl.bfloat16))
    tl.store(scaled_ptr + offs, x.to(tl.float32) * 0.5)


def test_bf16_elementwise_matches_torch():
    n = 1024
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(n, generator=g) * 10).to(torch.bfloat16).to(DEVICE)
    y = (torch.randn(n, generator=g) * 10).to(torch.bfloat16).to(DEVICE)
    i = torch.randint(-70000, 70000, (n,), generator=g, dtype=torch.int32).to(DEVICE)
    outs = [torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(4)]
    lt = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    fma, cast, icast = (torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    scaled = torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)
    _elementwise_kernel[(1,)](x, y, i, *outs, lt, fma, cast, icast, scaled, N=n)
    add, mul, sub, mx = outs
    assert torch.equal(add, x + y) and torch.equal(mul, x * y) and torch.equal(sub, x - y)
    assert torch.equal(mx, torch.maximum(x, y)) and torch.equal(lt, (x < y).int())
    assert torch.equal(fma, (x.float() * y.float() + x.float()).to(torch.bfloat16))
    assert torch.equal(cast, (x.float() * 3.0).to(torch.bfloat16)) and torch.equal(icast, i.to(torch.bfloat16))
    assert torch.equal(scaled, x.float() * 0.5)


@triton.jit
def _reduce_dot_kernel(a_ptr, b_ptr, sum_ptr, max_ptr, dot_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm = tl.arange(0, M)
    rk = tl.arange(0, K)
    rn = tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(sum_ptr + rm, tl.sum(a.to(tl.float32), axis=1).to(tl.bfloat16))
    tl.store(max_ptr + rm, tl.max(a, axis=1))
    acc = tl.dot(a, b)
    tl.store(dot_ptr + rm[:, None] * N + rn[None, :], acc)


def test_bf16_reductions_and_dot():
    m, k, n = 32, 64, 16
    g = torch.Generator().manual_seed(9)
    a = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(k, n, generator=g).to(torch.bfloat16).to(DEVICE)
    sums = torch.full((m,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    maxes = torch.full((m,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    dot = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    _reduce_dot_kernel[(1,)](a, b, sums, maxes, dot, M=m, K=k, N=n)
    torch.testing.assert_close(sums, a.float().sum(1).to(torch.bfloat16), rtol=8e-3, atol=1e-2)
    assert torch.equal(maxes, a.max(1).values)
    ref = a.double() @ b.double()
    assert (dot.double() - ref).norm() / ref.norm() < 1e-5  # fp32 accumulation of exact bf16 products


@triton.jit
def _fp8_cast_kernel(x_ptr, e4_ptr, e5_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(e4_ptr + offs, x.to(tl.float8e4nv))
    tl.store(e5_ptr + offs, x.to(tl.float8e5))


def test_fp32_to_fp8_rounds_to_nearest_even():
    """Values whose rounding carries into the exponent (127.9 -> 128 in e4m3), ties, and saturation at the largest
    finite value: as torch (and the GPU's cvt.rn.satfinite) round them."""
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(1000, generator=g) * 100, torch.tensor([127.9, -127.9, 168.0, 88.0, 15.75, 448.0,
                                                                        0.0, 1e-9, -3.0])])
    x = x[:1024] if x.numel() >= 1024 else torch.cat([x, torch.ones(1024 - x.numel())])
    x = x.clamp(-440, 440).to(DEVICE)  # in range of e4m3 (saturation differs between torch and satfinite above)
    e4 = torch.empty(1024, dtype=torch.float8_e4m3fn, device=DEVICE)
    e5 = torch.empty(1024, dtype=torch.float8_e5m2, device=DEVICE)
    _fp8_cast_kernel[(1,)](x, e4, e5, N=1024)
    assert torch.equal(e4.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(e5.view(torch.uint8), x.to(torch.float8_e5m2).view(torch.uint8))
