"""Tutorial 3: AllGather + GEMM in one kernel, where every GEMM tile waits only for the chunk it reads.

Run it with ``triton-dist run -n 4 tutorials/03_ag_gemm.py`` (GPUs when present, otherwise a CPU world of
processes running the kernel under Triton's interpreter).

A column-parallel linear layer: rank ``r`` holds rows ``[r*m, (r+1)*m)`` of the activations (its shard ``a``,
m x K) and its own slice ``b`` (K x N) of the weights; it needs ``C = all_gather(a) @ b`` (M x N, M = world * m).
Run one after the other (NCCL, then cuBLAS) the GEMM idles until the last byte arrived. Here one kernel does both,
and a tile of C starts as soon as *its* rows are in. Symmetric buffers, made once: ``gathered`` (M x K; chunk
``s`` = the rows of rank ``s``) and ``flags`` (world int32; ``flags[s]`` counts the pieces of chunk ``s`` that have
landed on this rank). The programs of the kernel, in pid order:

1. **Producers** (the first ``world * PIECES``): program ``(i, p)`` stores piece ``p`` of my shard into chunk
   ``me`` of ``gathered`` on rank ``(me - i) % world`` (plain stores through ``dl.symm_at``), then adds 1 to
   ``flags[me]`` there with ``dl.notify``: a release, so the piece is visible no later than the count.
2. **GEMM tiles** (the rest): a BLOCK_M x BLOCK_N tile's rows lie in one chunk ``s``. It spins in ``dl.wait``
   until ``flags[s] == call * PIECES`` (acquire), makes ``gathered`` depend on the wait with ``dl.consume_token``,
   and runs an ordinary K loop of ``tl.dot``. Tiles are numbered from my own chunk on (``me``, ``me+1``, ...):
   my chunk is complete first (no NVLink), and rank ``me+i`` sends me its chunk from its producer ``i``, so
   chunks arrive in the order the tiles ask for them.

::

    rank 1 of 3 (PIECES = 1), time ->          "==" a tile computing, ".." a tile spinning on its flag
    producers:  p0: a1 -> rank 1   p1: a1 -> rank 0   p2: a1 -> rank 2      (meanwhile ranks 0 and 2 push theirs)
    flags[1]    1 (my own p0)
    flags[2]          1  (rank 2's p1 stored a2 into chunk 2 here, then notified)
    flags[0]                   1  (rank 0's p2)
    tiles of chunk 1 (own):  ====|====
    tiles of chunk 2:        ..====|====
    tiles of chunk 0:        .....====|====

**No deadlock.** Producers never wait; tiles wait only for producers, whose pids are lower: the interpreter runs
programs one at a time in pid order, so it finishes the producers first, and a GPU dispatches them first.

**Reusing the buffers.** Flags are never reset: after call ``k`` every ``flags[s]`` is exactly ``k * PIECES``, so
call ``k+1`` waits for ``(k+1) * PIECES``. Each call starts with ``triton_dist.stream_barrier()`` (a device-side
barrier on GPUs): no rank pushes call ``k+1``'s shard into a peer whose GEMM still reads call ``k``'s, and no count
moves past ``k * PIECES`` while a call-``k`` tile waits for it. (Tutorial 2 does without the barrier.)
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
def ag_gemm_kernel(a_ptr, b_ptr, c_ptr, gathered_ptr, flags_ptr, m, N, call, K: tl.constexpr,
                   PIECES: tl.constexpr, COPY_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Producers push my shard ``a`` (m x K) into every rank's ``gathered``; tiles compute ``gathered @ b``."""
    me = dl.rank()
    world = dl.num_ranks()
    pid = tl.program_id(0)
    if pid < world * PIECES:  # producer (i, p)
        peer = (me - pid // PIECES + world) % world
        span = tl.cdiv(tl.cdiv(m * K, PIECES), COPY_BLOCK) * COPY_BLOCK  # piece size, whole copy blocks
        off = (pid % PIECES) * span
        end = tl.minimum(off + span, m * K)
        dst = dl.symm_at(gathered_ptr, peer) + me * m * K  # chunk `me` on the peer
        while off < end:  # (a while loop: runtime bounds, see tutorial 2)
            idx = tl.multiple_of(off, 16) + tl.arange(0, COPY_BLOCK)
            tl.store(dst + idx, tl.load(a_ptr + idx, mask=idx < end), mask=idx < end)
            off += COPY_BLOCK
        dl.notify(flags_ptr + me, peer, signal=1, sig_op="add", comm_scope="intra_node")  # release
    else:  # GEMM tile, numbered from my own chunk on
        t = pid - world * PIECES
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_chunk = m // BLOCK_M
        tile_m = (t // tiles_n + me * per_chunk) % (world * per_chunk)
        token = dl.wait(flags_ptr + tile_m // per_chunk, 1, scope="sys", semantic="acquire",
                        wait_value=call * PIECES)
        # loads through a_rows stay after the wait; multiple_of gives back the 16-byte alignment the token's asm
        # hides from the compiler (heap objects are 256-byte aligned), so the K loop keeps vector, pipelined loads
        a_rows = tl.multiple_of(dl.consume_token(gathered_ptr, token), 16)
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_rows + rows[:, None] * K + (k0 + ks)[None, :], mask=(k0 + ks)[None, :] < K, other=0.0)
            b = tl.load(b_ptr + (k0 + ks)[:, None] * N + cols[None, :],
                        mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=cols[None, :] < N)


class AGGemm:
    """``all_gather(a) @ b`` for shards ``a`` (m x K) and weights ``b`` (K x N). Made once (collective)."""

    def __init__(self, m: int, K: int, N: int, dtype: torch.dtype, *, pieces: int, block_m: int, block_n: int,
                 block_k: int, num_warps: int, num_stages: int):
        self.world = triton_dist.current_world()
        W = self.world.world_size
        if m % block_m or K % 16 or W * m * max(K, N) >= 2**31:
            raise ValueError(f"AGGemm: need m % {block_m} == 0 (a tile's rows in one chunk), K % 16 == 0 (aligned "
                             f"copies) and world * m * max(K, N) < 2**31; got m={m}, K={K}, N={N}")
        self.m, self.K, self.N, self.dtype = m, K, N, dtype
        self.meta = dict(K=K, PIECES=pieces, COPY_BLOCK=4096 if K * m >= 4096 else 1024, BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
        self.grid = (W * pieces + (W * m // block_m) * triton.cdiv(N, block_n),)
        self.gathered = triton_dist.empty((W * m, K), dtype)
        self.flags = triton_dist.zeros((W,), torch.int32)
        self.call = 0
        triton_dist.barrier()  # every rank's flags are zero before anyone counts

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != (self.m, self.K) or b.shape != (self.K, self.N) or not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"AGGemm: expected contiguous a ({self.m}, {self.K}) and b ({self.K}, {self.N}), got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        self.call += 1
        c = torch.empty((self.world.world_size * self.m, self.N), dtype=self.dtype, device=a.device)
        triton_dist.stream_barrier()  # every peer finished reading its `gathered` of the previous call
        ag_gemm_kernel[self.grid](a, b, c, self.gathered, self.flags, self.m, self.N, self.call, **self.meta)
        return c


def main() -> None:
    world = triton_dist.init()
    gpu = world.device.type == "cuda"
    W = world.world_size
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=(4096 if gpu else 32 * W), help="M, rows of C (world * rows per shard)")
    p.add_argument("--k", type=int, default=8192 if gpu else 80, help="K, a multiple of 16")
    p.add_argument("--n", type=int, default=2048 if gpu else 48, help="N, columns of b and C per rank")
    p.add_argument("--iters", type=int, default=20, help="timed calls per provider (GPUs only)")
    args = p.parse_args()
    if args.m % W:
        raise SystemExit(f"--m {args.m} is not divisible by the world size {W}")
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter gets bf16 tl.dot wrong
    tiles = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, pieces=8) if gpu else \
        dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1, pieces=1)
    op = AGGemm(args.m // W, args.k, args.n, dtype, **tiles)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13

    def nccl_then_matmul(a, b, gathered):
        gather(gathered, a, group=world.group)
        return gathered @ b

    bad = 0
    for call in range(3):  # fresh data every call, the same symmetric buffers
        g = torch.Generator().manual_seed(1000 * call + world.rank)
        a = (torch.rand((args.m // W, args.k), generator=g) * 2 - 1).to(dtype).to(world.device)
        b = ((torch.rand((args.k, args.n), generator=g) * 2 - 1) / args.k ** 0.5).to(dtype).to(world.device)
        gathered = torch.empty((args.m, args.k), dtype=dtype, device=world.device)
        ours, theirs = op(a, b).float(), nccl_then_matmul(a, b, gathered).float()
        exact = gathered.float() @ b.float()
        # both round an fp32 accumulation once: allow twice torch's own error plus one ulp of the largest value
        limit = 2 * (theirs - exact).abs().max() + torch.finfo(dtype).eps * exact.abs().max()
        bad += not bool((ours - exact).abs().max() <= limit)
    failures = torch.tensor([bad])
    dist.all_reduce(failures, group=world.group)  # a CPU tensor: gloo on every backend
    rows = [("world size", W), ("backend", world.backend), ("a per rank (m, K)", f"({args.m // W}, {args.k})"),
            ("b per rank (K, N)", f"({args.k}, {args.n})"), ("C per rank (M, N)", f"({args.m}, {args.n})"),
            ("dtype", str(dtype).replace("torch.", "")), ("calls on the same buffers", op.call),
            ("match", "no" if failures.item() else "yes")]
    if gpu and world.shared_gpu:
        rows.append(("timing", "skipped: ranks share a GPU, so times are not performance"))
    elif gpu and not failures.item():
        gathered = torch.empty((args.m, args.k), dtype=dtype, device=world.device)
        t_ours = median_ms(lambda: op(a, b), iters=args.iters, group=world.group)
        t_nccl = median_ms(lambda: nccl_then_matmul(a, b, gathered), iters=args.iters, group=world.group)
        t_mm = median_ms(lambda: gathered @ b, iters=args.iters, group=world.group)
        rows += [("triton-dist median", f"{t_ours:.3f} ms"), ("NCCL all-gather + cuBLAS median", f"{t_nccl:.3f} ms"),
                 ("cuBLAS GEMM alone median", f"{t_mm:.3f} ms"), ("NCCL+cuBLAS time / ours", f"{t_nccl / t_ours:.2f}"),
                 ("card", torch.cuda.get_device_name(world.device))]
    if world.rank == 0:
        width = max(len(k) for k, _ in rows)
        print("AllGather + GEMM (tutorials/03_ag_gemm.py)")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    triton_dist.finalize()
    if failures.item():
        raise SystemExit(f"AllGather + GEMM differs from all_gather + matmul in {failures.item()} (rank, call) pairs")


if __name__ == "__main__":
    main()
