"""Does torch.matmul (cuBLAS) give wrong results for finite bf16 inputs under an MPS SM cap? (GPU machine:
``python3 scripts/probe_matmul_mps.py [PERCENT,...]``.)

Why: on one H200 (2026-12-01) the reference of ``tests/test_gemm_gpu.py`` at 3 ranks (``torch.matmul`` of bf16
products with M = 135, K = 1024, N = 768) returned NaN, while our result was finite; ranks there run as MPS clients
capped at 33 % (42 SMs). A first run of this probe found 457 of 900 products wrong (errors of ~100 where bf16
rounding explains < 1) at 33 % and none without MPS, uncapped, at 50 % or at 25 %. This script runs the products
of the tests (three B layouts, every M from 1 to 300, K = 1024, N = 768) and a few M at two more shapes, in fresh
processes: without MPS, as an MPS client, and capped at each percentage (default: a sweep around 100 / 3). It
prints, per setting, the SM count and the products whose result has NaN/inf or differs from an fp64 product by more
than bf16 rounding can explain, as M ranges per shape and layout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_mps import each_setting  # noqa: E402

SWEEP = (20, 25, 28, 30, 31, 32, 33, 34, 35, 36, 40, 45, 50)

PROBE = r"""
import torch
torch.manual_seed(0)
bad, total = {}, 0
shapes = [((1024, 768), range(1, 301)), ((4096, 4096), (1, 7, 16, 33, 64, 100, 135, 200, 256, 300)),
          ((1002, 517), (1, 7, 16, 33, 64, 100, 135, 200, 256, 300))]
for (k, n), ms in shapes:
    for layout in ("row", "t", "strided"):
        for m in ms:
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
            total += 1
            if not torch.isfinite(c).all() or err > 0.02 * exact.abs().max().item() + 0.1:
                bad.setdefault(f"K={k} N={n} {layout}", []).append(m)

def ranges(ms):
    out, lo = [], None
    for i, m in enumerate(ms):
        lo = m if lo is None else lo
        if i + 1 == len(ms) or ms[i + 1] != m + 1:
            out.append(str(lo) if lo == m else f"{lo}-{m}")
            lo = None
    return ",".join(out)

print(torch.cuda.get_device_properties(0).multi_processor_count, "SMs;", sum(map(len, bad.values())), "of", total,
      "bad;", "; ".join(f"{key}: M {ranges(ms)}" for key, ms in bad.items()) or "-")
"""


def main():
    pcts = tuple(int(p) for p in sys.argv[1].split(",")) if len(sys.argv) > 1 else SWEEP
    each_setting(PROBE, "wrong bf16 products", timeout=300, percentages=pcts)


if __name__ == "__main__":
    main()
