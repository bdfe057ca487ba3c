"""Diagnosis (temporary): the 4-rank gemm_rs GPU test body with per-call phase timings and periodic stack dumps."""
import faulthandler, sys, time
sys.path.insert(0, "tests")
import torch
import triton_dist
from triton_dist.kernels import gemm_rs as grs
from test_gemm_ops import LAYOUTS, check_gemm
from test_gemm_gpu import _all_partials

triton_dist.init()
w = triton_dist.current_world()
faulthandler.dump_traceback_later(12, repeat=True, file=sys.stderr)
method = sys.argv[1] if len(sys.argv) > 1 else "sequential_reduce"
BF16 = torch.bfloat16
m_most, k, n = 256, 1024, 768
ctx = grs.GemmRSContext(w.world_size * m_most, k, n, BF16)
g = torch.Generator().manual_seed(5)
t_all = time.time()
for call in range(20):
    m_loc = int(torch.randint(1, m_most + 1, (1,), generator=g))
    t0 = time.time()
    a, b, exact = _all_partials(w.world_size * m_loc, k, n, 1000 * call, LAYOUTS[call % 3])
    torch.cuda.synchronize(); t1 = time.time()
    got = grs.gemm_rs(a, b, ctx=ctx, method=method)
    torch.cuda.synchronize(); t2 = time.time()
    ref = grs.gemm_rs_reference(a, b)
    torch.cuda.synchronize(); t3 = time.time()
    check_gemm(got, exact[w.rank * m_loc:(w.rank + 1) * m_loc], ref, BF16, f"call {call}")
    t4 = time.time()
    print(f"rank {w.rank} call {call} m_loc {m_loc} {LAYOUTS[call % 3]}: data {t1-t0:.3f} op {t2-t1:.3f} "
          f"ref {t3-t2:.3f} check {t4-t3:.3f}", flush=True)
print(f"rank {w.rank} {method} total {time.time()-t_all:.1f} s", flush=True)
faulthandler.cancel_dump_traceback_later()
ctx.close()
triton_dist.finalize()
