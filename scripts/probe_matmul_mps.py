"""Does torch.matmul (cuBLAS) return NaN for finite bf16 inputs under an MPS SM cap? (GPU machine:
``python3 scripts/probe_matmul_mps.py``.)

Why: on one H200 (2026-12-01) the reference of ``tests/test_gemm_gpu.py`` at 3 ranks, ``torch.matmul`` of a
(135 x 1024) bf16 A and a (1024 x 768) B viewed with stride 2 (the "strided" layout), returned NaN in two runs, while
our ag_gemm result was finite; ranks there run as MPS clients capped at 33 % (42 SMs). This script runs the same
products, with the three B layouts of the tests and every M from 1 to 300, in fresh processes: without MPS, as an
MPS client, and capped at 50 / 33 / 25 %. It prints, per setting, the (M, layout) pairs whose result has NaN/inf or
differs from an fp64 product by more than bf16 rounding can explain.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_mps import each_setting  # noqa: E402

PROBE = r"""
import torch
torch.manual_seed(0)
k, n = 1024, 768
bad = []
for layout in ("row", "t", "strided"):
    for m in range(1, 301):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if layout == "row":
            b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        elif layout == "t":
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()
        else:
            b = torch.randn(k, 2 * n, device="cuda", dtype=torch.bfloat16)[:, ::2]
        c = torch.matmul(a, b)
        exact = a.double() @ b.double()
        err = (c.double() - exact).abs().max().item()
        tol = 0.02 * exact.abs().max().item() + 0.1
        if not torch.isfinite(c).all() or err > tol:
            bad.append((m, layout, "nan/inf" if not torch.isfinite(c).all() else round(err, 3)))
print(torch.cuda.get_device_properties(0).multi_processor_count, "SMs;", len(bad), "bad:", bad[:12])
"""


def main():
    each_setting(PROBE, "bad (M, layout) products", timeout=300)


if __name__ == "__main__":
    main()
