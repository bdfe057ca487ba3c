"""Tutorial 6: GEMM + ReduceScatter by decomposition: cuBLAS per chunk, DMA on copy streams, signals at the edges.

Run it with ``triton-dist run -n 4 tutorials/06_gemm_rs_decomposed.py`` (GPUs when present, otherwise a CPU world of
processes running the kernels under Triton's interpreter).

The problem is tutorial 4's (a row-parallel linear layer: rank ``r`` holds ``a`` (M x k) and ``b`` (k x N); rank
``o`` needs rows ``[o*m, (o+1)*m)`` of ``sum over r of a_r @ b_r``), solved the other way round. Tutorial 4 puts the
communication *inside* one GEMM kernel (each tile stored on its owner, one flag per tile). Here the GEMM stays
cuBLAS and the overlap comes from the *streams*:

1. Split the GEMM by destination: rank ``me`` computes ``C_d = a[d*m:(d+1)*m] @ b`` for ``d = me+1, me+2, ...`` and
   its own rows last, each a ``torch.matmul`` into a local buffer ``send[d]``, one after another on the main stream.
2. After each matmul the main stream records an event; a *copy stream* (one per peer, so the copies run side by side)
   waits for that event and copies ``send[d]`` into slot ``me`` of rank ``d``'s symmetric ``recv`` through a peer
   view (``triton_dist.peer_view``: a DMA over NVLink by the copy engine, no SM used), while the main stream already
   computes the next chunk.
3. Two one-program kernels on the copy stream frame each copy: *before*, wait until ``done[d] >= call - 1`` (rank
   ``d`` finished reading its ``recv`` in the previous call, so the slot may be overwritten); *after*, set
   ``arrived[me] = call`` on rank ``d`` (a release store: stream order puts the finished copy before it).
4. The main stream waits for the copy streams (``wait_stream``: the copies of *my* partials are done), then a
   reduction kernel waits for ``arrived[s] >= call`` of every peer ``s``, sums the ``world`` slots in rank order in
   fp32 (mine straight from ``send[me]``) and a last one-program kernel sets ``done[me] = call`` on every rank.

::

    rank 0 of 3, time ->
    main stream:   mm C_1 | mm C_2 | mm C_0 (mine) | wait copies | reduce (wait arrived[1], arrived[2]) | done
    copy stream 1:        wait done[1] >= call-1, copy C_1 -> rank 1 recv[0], arrived[0] = call on rank 1
    copy stream 2:                 wait done[2] >= call-1, copy C_2 -> rank 2 recv[0], arrived[0] = call on rank 2

The events and ``wait_stream`` calls order work *within* a rank (and are captured by CUDA graphs); the signals order
work *between* ranks. No signal is ever reset: the call number only grows, so waits are ``>=`` and a value left from
an earlier call never satisfies a later one. In the CPU world there are no streams: everything runs in program
order, and the same signals make it correct.

When does it win? The copies hide behind the next matmul when a chunk's matmul takes longer than its copy, i.e. for
large GEMMs (this is ``ops.gemm_rs(method="decomposed")``: 1.07x the GEMM alone at M=8192 k=7168 N=8192 on 4x H100,
1.19x faster than cuBLAS then NCCL). For small GEMMs the fixed cost of the extra launches dominates: tutorial 4's
fused kernel, or the library's ``sequential_reduce``, is the better tool there.
"""
import argparse
import contextlib

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.bench.harness import median_ms


@triton.jit(do_not_specialize=["call"])
def before_copy(done_ptr, dst, call):
    """Rank ``dst`` finished reading its receive buffer in the previous call."""
    dl.wait(done_ptr + dst, 1, scope="sys", semantic="acquire", wait_value=call - 1, cmp="ge")


@triton.jit(do_not_specialize=["call"])
def after_copy(arrived_ptr, dst, call):
    """My partial of ``dst``'s rows is in slot ``me`` of ``dst``'s receive buffer."""
    dl.notify(arrived_ptr + dl.rank(), dst, signal=call, sig_op="set", comm_scope="intra_node")


@triton.jit(do_not_specialize=["call"])
def reduce_kernel(own_ptr, recv_ptr, out_ptr, arrived_ptr, n, call, BLOCK: tl.constexpr):
    """Sum the ``world`` partials of my rows (``n`` elements each) in rank order, once every peer's arrived."""
    me = dl.rank()
    world = dl.num_ranks()
    slots = recv_ptr
    s = 0
    while s < world:  # (runtime bounds, see tutorial 2)
        if s != me:
            token = dl.wait(arrived_ptr + s, 1, scope="sys", semantic="acquire", wait_value=call, cmp="ge")
            slots = dl.consume_token(slots, token)  # the loads below stay after the waits
        s += 1
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    s = 0
    while s < world:
        if s == me:
            acc += tl.load(own_ptr + offs, mask=mask).to(tl.float32)
        else:
            acc += tl.load(slots + s * n + offs, mask=mask).to(tl.float32)
        s += 1
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["call"])
def finish(done_ptr, call):
    """After the reduction (stream order): every rank may overwrite its slot in my receive buffer again."""
    me = dl.rank()
    for peer in range(dl.num_ranks()):
        dl.notify(done_ptr + me, peer, signal=call, sig_op="set", comm_scope="intra_node")


class DecomposedGemmRS:
    """``reduce_scatter(a @ b)`` for ``a`` (M x k) and ``b`` (k x N) by one cuBLAS matmul per destination and DMA
    copies on copy streams. Made once (collective)."""

    def __init__(self, M: int, k: int, N: int, dtype: torch.dtype):
        self.world = triton_dist.current_world()
        W, me = self.world.world_size, self.world.rank
        if M % W:
            raise ValueError(f"DecomposedGemmRS: M ({M}) must be a multiple of the world size {W}")
        self.M, self.m, self.k, self.N, self.dtype = M, M // W, k, N, dtype
        self.recv = triton_dist.empty((W, self.m, N), dtype)  # slot s: rank s's partial of my rows
        self.peer_recv = [triton_dist.peer_view(self.recv, p) for p in range(W)]
        self.send = torch.empty((W, self.m, N), dtype=dtype, device=self.world.device)  # my partials, by owner
        signals = triton_dist.zeros((2 * W,), torch.int32)
        self.signals, self.done, self.arrived = signals, signals[:W], signals[W:]
        self.gpu = self.world.device.type == "cuda"
        if self.gpu:
            self.streams = [torch.cuda.Stream() for _ in range(W - 1)]
            self.events = [torch.cuda.Event() for _ in range(W)]
        self.me, self.call = me, 0
        triton_dist.barrier()  # every rank's signals are zero before anyone notifies

    def _copy_stream(self, i: int, d: int):
        """Copy stream i, after the matmul of chunk d (CPU world: program order)."""
        if not self.gpu:
            return contextlib.nullcontext()
        self.events[d].record()
        self.streams[i].wait_event(self.events[d])
        return torch.cuda.stream(self.streams[i])

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != (self.M, self.k) or b.shape != (self.k, self.N):
            raise ValueError(f"DecomposedGemmRS: expected a ({self.M}, {self.k}) and b ({self.k}, {self.N}), got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        W, me, m = self.world.world_size, self.me, self.m
        self.call += 1
        out = torch.empty((m, self.N), dtype=self.dtype, device=a.device)
        for i in range(1, W):
            d = (me + i) % W
            torch.matmul(a[d * m:(d + 1) * m], b, out=self.send[d])
            with self._copy_stream(i - 1, d):
                before_copy[(1,)](self.done, d, self.call, num_warps=1)
                self.peer_recv[d][me].copy_(self.send[d])
                after_copy[(1,)](self.arrived, d, self.call, num_warps=1)
        torch.matmul(a[me * m:(me + 1) * m], b, out=self.send[me])
        if self.gpu:
            for st in self.streams:
                torch.cuda.current_stream().wait_stream(st)
        n, block = m * self.N, (8192 if self.gpu else 1024)
        reduce_kernel[(triton.cdiv(n, block),)](self.send[me], self.recv, out, self.arrived, n, self.call,
                                                BLOCK=block, num_warps=8 if self.gpu else 4)
        finish[(1,)](self.done, self.call, num_warps=1)
        return out


def main() -> None:
    world = triton_dist.init()
    gpu = world.device.type == "cuda"
    W, me = world.world_size, world.rank
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192 if gpu else 16 * W,
                   help="M, rows of a (a multiple of the world size)")
    p.add_argument("--k", type=int, default=7168 if gpu else 40, help="k, the inner dimension per rank")
    p.add_argument("--n", type=int, default=8192 if gpu else 36, help="N, columns of b and of the result")
    p.add_argument("--iters", type=int, default=20, help="timed calls per provider (GPUs only)")
    args = p.parse_args()
    dtype = torch.bfloat16 if gpu else torch.float16
    op = DecomposedGemmRS(args.m, args.k, args.n, dtype)
    m = args.m // W
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13

    def matmul_then_nccl(a, b, res):
        scatter(res, a @ b, group=world.group)
        return res

    bad = 0
    for call in range(3):  # fresh data every call, the same buffers and signals
        g = torch.Generator().manual_seed(1000 * call + me)
        a = (torch.rand((args.m, args.k), generator=g) * 2 - 1).to(dtype).to(world.device)
        b = ((torch.rand((args.k, args.n), generator=g) * 2 - 1) / (W * args.k) ** 0.5).to(dtype).to(world.device)
        ours = op(a, b).float()
        exact = a.float() @ b.float()
        dist.all_reduce(exact, group=world.group)
        exact = exact[me * m:(me + 1) * m]
        theirs = matmul_then_nccl(a, b, torch.empty((m, args.n), dtype=dtype, device=world.device)).float()
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
        res = torch.empty((m, args.n), dtype=dtype, device=world.device)
        t_ours = median_ms(lambda: op(a, b), iters=args.iters, group=world.group)
        t_nccl = median_ms(lambda: matmul_then_nccl(a, b, res), iters=args.iters, group=world.group)
        t_mm = median_ms(lambda: a @ b, iters=args.iters, group=world.group)
        rows += [("triton-dist median", f"{t_ours:.3f} ms"),
                 ("cuBLAS + NCCL reduce-scatter median", f"{t_nccl:.3f} ms"),
                 ("cuBLAS GEMM alone median", f"{t_mm:.3f} ms"), ("cuBLAS+NCCL time / ours", f"{t_nccl / t_ours:.2f}"),
                 ("card", torch.cuda.get_device_name(world.device))]
    if world.rank == 0:
        width = max(len(k) for k, _ in rows)
        print("GEMM + ReduceScatter by decomposition (tutorials/06_gemm_rs_decomposed.py)")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    triton_dist.finalize()
    if failures.item():
        raise SystemExit(f"GEMM + ReduceScatter differs from matmul + reduce_scatter in {failures.item()} "
                         "(rank, call) pairs")


if __name__ == "__main__":
    main()
