"""``triton-dist bench gemm`` with torch stand-ins for our ops, so the bench's own path for our providers (check,
timing, rows, failure report) is tested whatever state the kernels are in.

    triton-dist run -n 2 --mode cpu tests/scripts/gemm_bench_standin.py {correct|wrong|raises} [bench options]

``wrong``: ``ag_gemm(method="sm")`` returns a result with one element off; ``raises``: ``gemm_rs(method="fused")``
raises a RuntimeError. The bench must record those as failures and exit with status 1.
"""
import sys

import torch
import torch.distributed as dist

from triton_dist import ops
from triton_dist.bench import gemm

MODE = sys.argv[1]


def ag_gemm(a, b, *, method="auto", return_gathered=False, out=None):
    gathered = torch.empty((a.shape[0] * dist.get_world_size(), a.shape[1]), dtype=a.dtype)
    dist.all_gather_into_tensor(gathered, a)
    res = torch.matmul(gathered, b, out=out)
    if MODE == "wrong" and method == "sm":
        res[0, 0] += 1.0
    return res


def gemm_rs(a, b, *, method="auto", out=None):
    if MODE == "raises" and method == "fused":
        raise RuntimeError("stand-in failure")
    part = a.float() @ b.float()
    res = torch.empty((a.shape[0] // dist.get_world_size(), b.shape[1]), dtype=torch.float32)
    dist.reduce_scatter_tensor(res, part)
    return out.copy_(res)


def gemm_ar(a, b, *, method="auto", out=None):
    part = a.float() @ b.float()
    dist.all_reduce(part)
    return out.copy_(part)


ops.ag_gemm, ops.gemm_rs, ops.gemm_ar = ag_gemm, gemm_rs, gemm_ar
gemm.main(sys.argv[2:])
