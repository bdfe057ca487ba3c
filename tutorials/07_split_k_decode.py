"""Tutorial 7: a decode-size GEMM that splits K, and a reduction done by whichever program finishes last.

Run it with ``triton-dist run -n 1 tutorials/07_split_k_decode.py`` (any ``-n``: every rank runs it on its own
device; a GPU when present, otherwise the CPU world's interpreter).

At decode a layer multiplies a few rows (the batch) by a weight: ``y = x @ w.t()`` with ``x`` (M x K), M from 1 to a
few hundred, and ``w`` (N x K) the ``nn.Linear`` weight. Every weight byte is read once and used M times, so the
time is the weight's bytes over the memory bandwidth, if enough SMs read at once. A GEMM tiled over N only has
``N / BLOCK_N`` programs: for Qwen3-8B's down projection (N = 4096) that is 32-64 programs on a 132-SM H200, and
most SMs idle. Splitting K gives ``tiles x SPLIT`` programs, each reading a ``K / SPLIT`` slice of its columns:

::

    program (tile t, split s):  acc = x[:, Ks] @ w[t, Ks].T          (fp32, its slice of K only)
                                partial[s][t] = acc                   (a workspace)
                                barrier; old = atomic_add(count[t], 1)   (acq_rel: the partial is visible first)
                                if old == SPLIT - 1:                  (I am the last split of tile t)
                                    y[t] = sum of partial[0..SPLIT-1][t], in split order
                                    count[t] = 0                      (ready for the next call)

No second kernel and no host sync: the last program to finish a tile reduces it. Summing in split order (not in
arrival order) makes the result the same bits on every call. The counter resets itself, so the same buffers serve
every call, CUDA graphs included. In the CPU world programs run one at a time in pid order, so the last split of a
tile (the largest pid) always reduces, and the kernel needs no change there.

The library's version (``triton_dist.kernels.decode_gemm.decode_gemm``) adds TMA loads, row tiles for M > 16, any
layout of ``b``, and a config chosen by the autotuner (``triton_dist.tune``) on GPUs. This tutorial's kernel is the
idea alone; both are checked against torch below.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
from triton_dist.bench.harness import median_ms
from triton_dist.kernels.decode_gemm import decode_gemm
from triton_dist.kernels.gemm import release_split_k_buffers


@triton.jit
def split_k_gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, k_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """``y = x @ w.t()`` for ``x`` (M x K, M <= BLOCK_M) and ``w`` (N x K), both row-major; grid (tiles, SPLIT)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_per_split, tl.minimum((split + 1) * k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    cell = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tiles = tl.num_programs(0)
    tl.store(part_ptr + (split * tiles + tile) * BLOCK_M * BLOCK_N + cell, acc)
    tl.debug_barrier()  # every thread's part of the partial is stored before the count
    if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT):  # split order: the same bits on every call
            total += tl.load(part_ptr + (s * tiles + tile) * BLOCK_M * BLOCK_N + cell, cache_modifier=".cg")
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], total.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


def split_k_gemv(x: torch.Tensor, w: torch.Tensor, split: int, block_n: int, block_k: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    tiles = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole K blocks per split
    block_m = max(16, triton.next_power_of_2(m))
    part = torch.empty(split * tiles * block_m * block_n, dtype=torch.float32, device=x.device)
    count = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    split_k_gemv_kernel[(tiles, split)](x, w, y, part, count, m, n, k, k_per_split, BLOCK_M=block_m,
                                        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split)
    assert int(count.abs().sum()) == 0, "every tile's counter was reset by its last split"
    return y


def main() -> None:
    world = triton_dist.init()
    gpu = not world.interpreted
    # CPU world: a small fp32 case (the interpreter is slow); GPU: Qwen3-8B's down projection at batch 4
    m, k, n, dtype = (4, 12288, 4096, torch.bfloat16) if gpu else (3, 320, 96, torch.float32)
    split, block_n, block_k = (4, 64, 128) if gpu else (4, 32, 32)
    g = torch.Generator().manual_seed(7 + world.rank)
    x = torch.randn(m, k, generator=g).to(dtype).to(world.device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(world.device)

    exact = x.double() @ w.double().t()
    ours = split_k_gemv(x, w, split, block_n, block_k)
    again = split_k_gemv(x, w, split, block_n, block_k)
    library = decode_gemm(x, w.t())
    scale = exact.abs().max().item()
    err = max((t.double() - exact).abs().max().item() for t in (ours, library)) / scale
    same_bits = torch.equal(ours, again)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    worst = torch.tensor([err, 0.0 if same_bits else 1.0], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=world.group)
    ok = worst[0].item() <= tol and worst[1].item() == 0.0
    if world.rank == 0:
        print(f"split-K decode GEMM: {world.world_size} rank(s), backend {world.backend}, M={m} K={k} N={n} "
              f"{str(dtype).replace('torch.', '')}, {split} splits")
        print(f"largest error vs fp64 (relative to max |y|): {worst[0].item():.3g}; same bits on a second call: "
              f"{'yes' if worst[1].item() == 0.0 else 'no'}")
    if gpu and not world.shared_gpu:  # times in a shared-GPU world are not performance
        ms = {name: median_ms(fn, group=world.group) for name, fn in (
            ("this tutorial's kernel", lambda: split_k_gemv(x, w, split, block_n, block_k)),
            ("decode_gemm (library)", lambda: decode_gemm(x, w.t())),
            ("torch.matmul (cuBLAS)", lambda: torch.matmul(x, w.t())))}
        if world.rank == 0:
            for name, t in ms.items():
                print(f"  {name:<24} {t * 1000:8.1f} us   {k * n * x.element_size() / (t * 1e-3) / 1e12:5.2f} TB/s "
                      "of weights")
    if world.rank == 0:
        print(f"match: {'yes' if ok else 'no'}")
    release_split_k_buffers()  # the library's cached split-K workspace and counters
    triton_dist.finalize()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
