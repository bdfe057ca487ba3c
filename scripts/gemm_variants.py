"""Where the dense core's time goes: variants of the persistent TMA GEMM timed against cuBLAS at world size 1.

Run on a GPU (world size 1; each variant checked against torch first, then timed: the slowest rank's median):

    triton-dist run -n 1 scripts/gemm_variants.py [--shapes 8192x7168x8192,...] [--variants v0,v5] [--iters 20]

Shapes are ``MxNxK`` of ``C = A @ B`` with ``B = w.t()`` of an ``nn.Linear`` weight ``w`` (N x K), as the ops see it.
Every variant keeps a chunk wait (``dl.wait`` on a flag that is already raised, as at world size 1) unless its name
says otherwise, so the measured kernel is the overlapped ops' code path. Prints one table: per shape, cuBLAS's time
and each variant's time and ratio (ours / cuBLAS: < 1 is faster). The findings are in docs/perf/NOTES.md
("Dense core").
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import triton_dist
import triton_dist.language as dl
from triton_dist.bench.harness import _quantile, time_op
from triton_dist.kernels.gemm import fence_async_proxy, grouped_tile, store_tile, tile_dot


@triton.jit
def _tile_epilogue(c_ptr, c_desc, acc, off_m, off_n, rows_end, N, stride_cm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr):
    if TMA_STORE:
        if SUBTILE == 2:
            acc = tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2))
            acc = tl.permute(acc, (0, 2, 1))
            c0, c1 = tl.split(acc)
            c_desc.store([off_m, off_n], c0.to(c_ptr.dtype.element_ty))
            c_desc.store([off_m, off_n + BLOCK_N // 2], c1.to(c_ptr.dtype.element_ty))
        else:
            c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))
    else:
        store_tile(c_ptr, acc, off_m, off_n, rows_end, N, stride_cm, 1, BLOCK_M, BLOCK_N)


@triton.jit
def _tile(a, b, c_ptr, c_desc, off_m, off_n, rows_end, N, K, stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr):
    """One output tile: the K loop (descriptors, B given as w [N, K]) and the epilogue."""
    acc = tile_dot(a, b, off_m, off_n, rows_end, N, K, 0, 0, 0, 0, BLOCK_M, BLOCK_N, BLOCK_K, True, True, "ieee")
    _tile_epilogue(c_ptr, c_desc, acc, off_m, off_n, rows_end, N, stride_cm, BLOCK_M, BLOCK_N, TMA_STORE, SUBTILE)


@triton.jit
def _variant_kernel(a, b, c_ptr, c_desc, flag_ptr, m_loc, N, K, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    WAIT: tl.constexpr, FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr):
    """``WAIT`` 0: no wait; 1: a wait (and proxy fence) per tile, as ``_ag_gemm_kernel``; 2: one per chunk, then
    the chunk's tiles in a ``tl.range`` loop (``FLATTEN``: flattened with the K loop, so the next tile's loads
    overlap this tile's epilogue)."""
    rank = dl.rank()
    world = dl.num_ranks()
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_m = tl.cdiv(m_loc, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_chunk = tiles_m * tiles_n
    if WAIT == 2:
        for i in range(world):
            src = (rank + i) % world
            token = dl.wait(flag_ptr + src, 1, "sys", "acquire", 1, cmp="ge")
            a_src = dl.consume_token(a, token)
            fence_async_proxy()
            first = ((pid - i * per_chunk) % nprog + nprog) % nprog
            for lt in tl.range(first, per_chunk, nprog, flatten=FLATTEN):
                pid_m, pid_n = grouped_tile(lt, tiles_m, tiles_n, GROUP_M)
                _tile(a_src, b, c_ptr, c_desc, src * m_loc + pid_m * BLOCK_M, pid_n * BLOCK_N, src * m_loc + m_loc, N,
                      K, stride_cm, BLOCK_M, BLOCK_N, BLOCK_K, TMA_STORE, SUBTILE)
    else:
        for t in range(pid, world * per_chunk, nprog):
            src = (rank + t // per_chunk) % world
            pid_m, pid_n = grouped_tile(t % per_chunk, tiles_m, tiles_n, GROUP_M)
            a_src = a
            if WAIT == 1:
                token = dl.wait(flag_ptr + src, 1, "sys", "acquire", 1, cmp="ge")
                a_src = dl.consume_token(a, token)
                fence_async_proxy()
            _tile(a_src, b, c_ptr, c_desc, src * m_loc + pid_m * BLOCK_M, pid_n * BLOCK_N, src * m_loc + m_loc, N, K,
                  stride_cm, BLOCK_M, BLOCK_N, BLOCK_K, TMA_STORE, SUBTILE)


# name: (block_m, block_n, block_k, group_m, stages, warps, WAIT, FLATTEN, TMA_STORE, SUBTILE, programs: 0 = all SMs)
VARIANTS = {
    "v0_op": (128, 256, 64, 8, 3, 8, 1, False, False, 1, 0),       # the ops' kernel today
    "v1_nowait": (128, 256, 64, 8, 3, 8, 0, False, False, 1, 0),   # price of the per-tile wait + fence
    "v2_chunkwait": (128, 256, 64, 8, 3, 8, 2, False, False, 1, 0),
    "v3_flat": (128, 256, 64, 8, 3, 8, 2, True, False, 1, 0),
    "v4_flat_tma": (128, 256, 64, 8, 3, 8, 2, True, True, 1, 0),
    "v5_flat_tma_sub": (128, 256, 64, 8, 3, 8, 2, True, True, 2, 0),
    "v6_s4": (128, 256, 64, 8, 4, 8, 2, True, True, 2, 0),
    "v7_g16": (128, 256, 64, 16, 3, 8, 2, True, True, 2, 0),
    "v8_128x128_s4": (128, 128, 64, 8, 4, 8, 2, True, True, 1, 0),
    "v9_128x128_s5_w4": (128, 128, 64, 8, 5, 4, 2, True, True, 1, 0),
    "v10_256x128": (256, 128, 64, 8, 3, 8, 2, True, True, 2, 0),
    "v11_tma_sub_noflat": (128, 256, 64, 8, 3, 8, 2, False, True, 2, 0),
    "v12_v5_131sm": (128, 256, 64, 8, 3, 8, 2, True, True, 2, -1),
    "v13_g4": (128, 256, 64, 4, 3, 8, 2, True, True, 2, 0),
    "v14_op_s4_g16": (128, 256, 64, 16, 4, 8, 1, False, False, 1, 0),  # gemm.GPU_CONFIG_16BIT since 2026-12-01
    "v15_op_narrow": (128, 128, 64, 8, 5, 4, 1, False, False, 1, 0),   # gemm.GPU_CONFIG_16BIT_NARROW
}
SHAPES = ("8192x7168x8192", "4096x2048x8192", "8192x8192x7168", "4096x14336x4096", "2048x8192x28672",
          "1024x29568x8192")


def run_variant(name, a, w, c, flag, sms):
    bm, bn, bk, g, st, wp, wait, flat, tma_store, sub, progs = VARIANTS[name]
    m, k = a.shape
    n = w.shape[0]
    a_d = TensorDescriptor(a, [m, k], [k, 1], [bm, bk])
    b_d = TensorDescriptor(w, [n, k], [k, 1], [bn, bk])
    c_d = TensorDescriptor(c, [m, n], [n, 1], [bm, bn // sub])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = min(tiles, sms + progs if progs <= 0 else progs)
    return lambda: _variant_kernel[(grid,)](a_d, b_d, c, c_d, flag, m, n, k, c.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                                            BLOCK_K=bk, GROUP_M=g, WAIT=wait, FLATTEN=flat, TMA_STORE=tma_store,
                                            SUBTILE=sub, num_stages=st, num_warps=wp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    world = triton_dist.init()
    if world.interpreted:
        print("gemm_variants: needs a GPU (timings)")
        return 0
    sms = world.num_sms
    names = args.variants.split(",")
    flag = torch.ones(world.world_size, dtype=torch.int32, device=world.device)  # every chunk is there already
    rows = []
    failed = 0
    for shape in args.shapes.split(","):
        m, n, k = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=world.device).manual_seed(m + n + k)
        a = (torch.rand((m, k), device=world.device, generator=g) - 0.5).to(torch.bfloat16)
        w = (torch.rand((n, k), device=world.device, generator=g) - 0.5).to(torch.bfloat16)
        ref = a.float() @ w.float().t()
        tol = 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item() + 1e-2
        c = torch.empty((m, n), dtype=torch.bfloat16, device=world.device)
        cub = _quantile(time_op(lambda: torch.matmul(a, w.t(), out=c), iters=args.iters, group=world.group), 0.5)
        flops = 2 * m * n * k
        rows.append((shape, "cublas", cub, 1.0))
        for name in names:
            try:
                fn = run_variant(name, a, w, c, flag, sms)
                c.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                err = (c.float() - ref).abs().max().item()
                if not err <= tol:
                    rows.append((shape, name, float("nan"), float("nan")))
                    print(f"{shape} {name}: WRONG, max err {err:.3g} > {tol:.3g}", flush=True)
                    failed += 1
                    continue
                us = _quantile(time_op(fn, iters=args.iters, group=world.group), 0.5)
                rows.append((shape, name, us, us / cub))
            except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported, not fatal)
                rows.append((shape, name, float("nan"), float("nan")))
                print(f"{shape} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            print(f"{rows[-1][0]:<18} {rows[-1][1]:<22} {rows[-1][2]:9.1f} us  x{rows[-1][3]:.3f}  "
                  f"{flops / rows[-1][2] / 1e6:6.0f} TFLOP/s", flush=True)
    if world.rank == 0:
        print("\nshape              variant                 median us   ours/cuBLAS   TFLOP/s")
        for shape, name, us, ratio in rows:
            m, n, k = (int(x) for x in shape.split("x"))
            print(f"{shape:<18} {name:<22} {us:9.1f}   {ratio:8.3f}   {2 * m * n * k / us / 1e6:8.0f}")
    triton_dist.finalize()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
