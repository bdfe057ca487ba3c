"""Tutorial 4: GEMM + ReduceScatter in one kernel: tiles go straight to their owner, one flag per tile.

Run it with ``triton-dist run -n 4 tutorials/04_gemm_rs.py`` (GPUs when present, otherwise a CPU world of
processes running the kernel under Triton's interpreter).

A row-parallel linear layer: rank ``r`` holds a slice of the inner dimension, ``a`` (M x k) and ``b`` (k x N),
so its product ``a @ b`` is only a partial sum. Rank ``o`` owns rows ``[o*m, (o+1)*m)`` (m = M / world) of the
result and needs ``sum over r of (a_r @ b_r)[o*m:(o+1)*m]`` (``reduce_scatter``). Run one after the other (cuBLAS,
then NCCL), the network idles during the GEMM and the GPU during the reduce-scatter. Here the GEMM's epilogue *is*
the send. Symmetric buffers, made once: ``recv`` (world x m x N: slot ``s`` receives rank ``s``'s partial of my
rows) and ``flags`` (world x T int32, T = tiles per chunk of m rows: ``flags[s][t]`` says tile ``t`` of slot ``s``
has landed). The programs of the kernel, in pid order:

1. **GEMM tiles** (the first ``world * T``), in rotated order: rank ``r`` computes the tiles of the rows owned by
   rank ``r+1`` first, then ``r+2``, ..., its own last. So at any moment each rank sends to a different owner
   (the traffic spreads over all links), and an owner's chunk arrives from everyone while it is still computing.
   A tile's K loop is an ordinary ``tl.dot`` loop; its result is stored with plain stores into slot ``me`` of
   ``recv`` on the owner (``dl.symm_at``), then ``dl.notify`` sets ``flags[me][t]`` there to the call number
   (a release: the tile is visible no later than the flag).
2. **Reduction** (the last ``T``): program ``t`` sums tile ``t`` of my rows over the slots in rank order; before
   reading slot ``s`` it waits until ``flags[s][t]`` equals the call number (``dl.wait``, acquire) and ties the
   load to the wait with ``dl.consume_token``. It accumulates in fp32 and rounds once.

::

    3 ranks, time ->      rank 0 computes        rank 1 computes        rank 2 computes
    GEMM step 1:          rows of rank 1 -+      rows of rank 2 -+      rows of rank 0 -+
    GEMM step 2:          rows of rank 2  |      rows of rank 0  |      rows of rank 1  |
    GEMM step 3 (own):    rows of rank 0  |      rows of rank 1  |      rows of rank 2  |
                          each tile: store -> recv[me] on its owner, notify flags[me][t] = call
    on rank 0:  recv[2] tile t  <- rank 2's step 1, flags[2][t] = call
                recv[1] tile t  <- rank 1's step 2, flags[1][t] = call
                recv[0] tile t  <- my own step 3,   flags[0][t] = call
    reduction program t on rank 0:  wait flags[0][t], += recv[0]; wait flags[1][t], += recv[1]; wait flags[2][t],
                                    += recv[2]; store rows 0..m of out

**No deadlock.** GEMM tiles never wait; the reduction waits only for GEMM tiles, whose pids are lower (the
interpreter runs programs in pid order; a GPU dispatches the lower pids first).

**Reusing the buffers.** The flag value is the call number, so flags are never reset: call ``k`` waits for ``k``
and a ``k-1`` left over does not satisfy it. Each call starts with ``triton_dist.stream_barrier()`` (a device-side
barrier on GPUs), so nobody overwrites an owner's ``recv`` while the owner is still reducing the previous call.
"""
import argparse

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.bench.harness import median_ms


@triton.jit(do_not_specialize=["call"])
def gemm_rs_kernel(a_ptr, b_ptr, out_ptr, recv_ptr, flags_ptr, m, N, call, K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMM tiles of ``a @ b`` pushed to their owners' ``recv``, then the sum of my rows' tiles into ``out``."""
    me = dl.rank()
    world = dl.num_ranks()
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    T = (m // BLOCK_M) * tiles_n  # tiles per chunk of m rows
    t = pid % T
    rows = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # within a chunk
    cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = rows[:, None] * N + cols[None, :]
    if pid < world * T:  # GEMM tile t of the rows owned by rank me+1, me+2, ..., me
        owner = (me + 1 + pid // T) % world
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + (owner * m + rows)[:, None] * K + (k0 + ks)[None, :], mask=(k0 + ks)[None, :] < K,
                        other=0.0)
            b = tl.load(b_ptr + (k0 + ks)[:, None] * N + cols[None, :],
                        mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
        slot = dl.symm_at(recv_ptr, owner) + me * m * N  # my slot on the owner
        tl.store(slot + tile, acc.to(out_ptr.dtype.element_ty), mask=cols[None, :] < N)
        dl.notify(flags_ptr + me * T + t, owner, signal=call, sig_op="set", comm_scope="intra_node")  # release
    else:  # reduction of my tile t over the slots, in rank order
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = 0
        while s < world:  # (a while loop: runtime bounds, see tutorial 2)
            token = dl.wait(flags_ptr + s * T + t, 1, scope="sys", semantic="acquire", wait_value=call)
            # loads stay after the wait; multiple_of restores the alignment the token hides (as in tutorial 3)
            src = tl.multiple_of(dl.consume_token(recv_ptr, token), 16) + s * m * N
            acc += tl.load(src + tile, mask=cols[None, :] < N, other=0.0).to(tl.float32)
            s += 1
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=cols[None, :] < N)


class GemmRS:
    """``reduce_scatter(a @ b)`` for ``a`` (M x k) and ``b`` (k x N): rows ``[r*m, (r+1)*m)`` of the sum on rank
    ``r``. Made once (collective)."""

    def __init__(self, M: int, k: int, N: int, dtype: torch.dtype, *, block_m: int, block_n: int, block_k: int,
                 num_warps: int, num_stages: int):
        self.world = triton_dist.current_world()
        W = self.world.world_size
        if M % W or (M // W) % block_m or M * max(k, N) >= 2**31:
            raise ValueError(f"GemmRS: need M % (world * {block_m}) == 0 (a tile's rows in one chunk) and "
                             f"M * max(k, N) < 2**31; got M={M}, k={k}, N={N}, world={W}")
        self.M, self.m, self.k, self.N, self.dtype = M, M // W, k, N, dtype
        self.meta = dict(K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                         num_stages=num_stages)
        tiles = (self.m // block_m) * triton.cdiv(N, block_n)
        self.grid = ((W + 1) * tiles,)  # world chunks of GEMM tiles, then my chunk's reduction
        self.recv = triton_dist.empty((W, self.m, N), dtype)
        self.flags = triton_dist.zeros((W, tiles), torch.int32)
        self.call = 0
        triton_dist.barrier()  # every rank's flags are zero before anyone notifies

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != (self.M, self.k) or b.shape != (self.k, self.N) or not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"GemmRS: expected contiguous a ({self.M}, {self.k}) and b ({self.k}, {self.N}), got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        self.call += 1
        out = torch.empty((self.m, self.N), dtype=self.dtype, device=a.device)
        triton_dist.stream_barrier()  # every owner finished reducing the previous call
        gemm_rs_kernel[self.grid](a, b, out, self.recv, self.flags, self.m, self.N, self.call, **self.meta)
        return out


def main() -> None:
    world = triton_dist.init()
    gpu = world.device.type == "cuda"
    W, me = world.world_size, world.rank
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192 if gpu else 32 * W, help="M, rows of a (world * rows per owner)")
    p.add_argument("--k", type=int, default=7168 if gpu else 40, help="k, the inner dimension per rank")
    p.add_argument("--n", type=int, default=8192 if gpu else 48, help="N, columns of b and of the result")
    p.add_argument("--iters", type=int, default=20, help="timed calls per provider (GPUs only)")
    args = p.parse_args()
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter gets bf16 tl.dot wrong
    tiles = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3) if gpu else \
        dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    op = GemmRS(args.m, args.k, args.n, dtype, **tiles)
    m = args.m // W
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13

    def matmul_then_nccl(a, b, res):
        scatter(res, a @ b, group=world.group)
        return res

    bad = 0
    for call in range(3):  # fresh data every call, the same symmetric buffers
        g = torch.Generator().manual_seed(1000 * call + me)
        a = (torch.rand((args.m, args.k), generator=g) * 2 - 1).to(dtype).to(world.device)
        b = ((torch.rand((args.k, args.n), generator=g) * 2 - 1) / (W * args.k) ** 0.5).to(dtype).to(world.device)
        res = torch.empty((m, args.n), dtype=dtype, device=world.device)
        ours, theirs = op(a, b).float(), matmul_then_nccl(a, b, res).float()
        exact = a.float() @ b.float()
        dist.all_reduce(exact, group=world.group)
        exact = exact[me * m:(me + 1) * m]
        # low-precision partials summed in fp32, one rounding: allow twice torch's error plus one ulp of the largest
        limit = 2 * (theirs - exact).abs().max() + torch.finfo(dtype).eps * exact.abs().max()
        bad += not bool((ours - exact).abs().max() <= limit)
    failures = torch.tensor([bad])
    dist.all_reduce(failures, group=world.group)  # a CPU tensor: gloo on every backend
    rows = [("world size", W), ("backend", world.backend), ("a per rank (M, k)", f"({args.m}, {args.k})"),
            ("b per rank (k, N)", f"({args.k}, {args.n})"), ("result per rank (M/world, N)", f"({m}, {args.n})"),
            ("dtype", str(dtype).replace("torch.", "")), ("calls on the same buffers", op.call),
            ("match", "no" if failures.item() else "yes")]
    if gpu and world.shared_gpu:
        rows.append(("timing", "skipped: ranks share a GPU, so times are not performance"))
    elif gpu and not failures.item():
        t_ours = median_ms(lambda: op(a, b), iters=args.iters, group=world.group)
        t_nccl = median_ms(lambda: matmul_then_nccl(a, b, res), iters=args.iters, group=world.group)
        t_mm = median_ms(lambda: a @ b, iters=args.iters, group=world.group)
        rows += [("triton-dist median", f"{t_ours:.3f} ms"),
                 ("cuBLAS + NCCL reduce-scatter median", f"{t_nccl:.3f} ms"),
                 ("cuBLAS GEMM alone median", f"{t_mm:.3f} ms"), ("cuBLAS+NCCL time / ours", f"{t_nccl / t_ours:.2f}"),
                 ("card", torch.cuda.get_device_name(world.device))]
    if world.rank == 0:
        width = max(len(k) for k, _ in rows)
        print("GEMM + ReduceScatter (tutorials/04_gemm_rs.py)")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    triton_dist.finalize()
    if failures.item():
        raise SystemExit(f"GEMM + ReduceScatter differs from matmul + reduce_scatter in {failures.item()} "
                         "(rank, call) pairs")


if __name__ == "__main__":
    main()
