"""Tutorial 2: an intra-node all-gather built from ``symm_at``, ``notify`` and ``wait``.

Run it with ``triton-dist run -n 4 tutorials/02_intra_node_allgather.py`` (or ``make demo``). Every rank holds
``x`` of shape (M, N); afterwards every rank's symmetric ``out`` of shape (world * M, N) holds all of them,
rank ``s``'s ``x`` in rows ``[s * M, (s + 1) * M)``. The result is checked exactly against
``torch.distributed.all_gather_into_tensor``; on GPUs both are timed.

The design, step by step:

1. **Push, don't pull.** Rank ``r`` writes its ``x`` into slot ``r`` of every peer's ``out`` (itself included)
   with ``dl.symm_at`` and plain stores. The push kernel has a grid of (world, CHUNKS): program (i, c) serves
   peer ``(r + i) % world`` (so the ranks start on different peers instead of all hitting rank 0 first) and
   copies every CHUNKS-th tile of ``x``, tiles being BLOCK_M x BLOCK_N with masks for the ragged edges.
2. **Count arrivals.** When a program has written its tiles it adds 1, with release semantics, to
   ``arrived[r]`` on the peer (``dl.notify(..., sig_op="add")``). There is one counter per source rank.
3. **Wait for everybody.** A one-program kernel waits until ``arrived[s] == call * CHUNKS`` for every ``s``
   (``dl.wait`` over ``world`` consecutive signals, acquire). After it, later kernels on this rank's stream
   may read ``out``.
4. **Reuse without resets: the call number.** ``arrived`` is never cleared. After call ``k`` every counter
   holds exactly ``k * CHUNKS``, so the next call waits for ``(k + 1) * CHUNKS`` and an old value can never
   satisfy a new wait.
5. **Don't overwrite what a peer is still reading: ready flags.** Without more care, a fast rank could start
   call ``k + 1`` and push into a slow peer's ``out`` while the peer is still reading the result of call ``k``.
   So each call begins with a tiny kernel in which rank ``r`` sets ``ready[r] = k`` on every peer: "my ``out``
   is free for call ``k``". It runs after everything this rank queued earlier on the same stream, i.e. after it
   finished reading the previous result. A push program waits for ``ready[peer] == k`` before it writes.

::

    rank r                                     rank p (one of the peers; r itself is one too)
    ------                                     ------
    ready kernel:  notify(ready[r] on p, k)  --------->  ready[r] == k          (my out is free)
    push kernel:   wait(ready[p] == k)       <---------  (p's ready kernel did the same for r)
                   store tiles -> out[slot r] on p  ---->  out rows [r*M, (r+1)*M)
                   notify(arrived[r] on p, +1)  ------->  arrived[r] += 1 (release, after the tiles)
    wait kernel:   wait(arrived[s] == k*CHUNKS for all s)                    (acquire)
                   -> out is complete on r; the caller reads it until its next call

Why three launches instead of one kernel: a program must never wait for a later program of the same launch.
Under Triton's interpreter (the CPU world) the programs of a launch run one after another in pid order, so
the first program to wait for something that a later program produces spins forever; on a GPU the same thing
happens whenever the grid does not fit on the chip at once, because nothing guarantees that the later
program is ever scheduled while the earlier one spins. Here every wait depends only on *other launches*: a
push program waits for the ready kernels of the peers (which wait for nothing), the wait kernel for the peers'
push kernels (which wait only for ready kernels). Every rank issues ready -> push -> wait in that order, so
each launch can always finish and the protocol cannot deadlock, in pid order or in any other.

Why the flags cannot be overtaken: ``ready[p]`` on rank r moves to ``k + 1`` only after p finished call ``k``,
which needs all of r's CHUNKS arrivals of call ``k``, each sent after that program saw ``ready[p] == k``; and
``arrived[r]`` on p passes ``k * CHUNKS`` only after p said ready for ``k + 1``. So the equality waits never miss
their value.

On the GPU the ordering is real: ``notify`` is a release (every store of the program happens before the
counter moves) and ``wait`` an acquire at system scope. In the CPU world scopes are ignored and programs run
one at a time, so it tests the protocol, not the memory model.
"""
import argparse

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.bench.harness import median_ms


@triton.jit
def ag_ready_kernel(signal_ptr, call):
    """Program ``p`` tells rank ``p``: this rank's ``out`` may be written for call ``call``."""
    dl.notify(signal_ptr + dl.rank(), tl.program_id(0), signal=call, sig_op="set", comm_scope="intra_node")


@triton.jit
def ag_push_kernel(x_ptr, out_ptr, signal_ptr, M, N, call, CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Program (i, c): copy every CHUNKS-th tile of ``x`` into slot ``rank`` of peer ``(rank + i) % world``'s
    ``out``, then count the arrival there. ``signal_ptr`` holds ``ready[world]`` then ``arrived[world]``."""
    me = dl.rank()
    world = dl.num_ranks()
    peer = (me + tl.program_id(0)) % world
    # the peer's out is free once it said so for this call (acquire: our stores stay after this)
    dl.wait(signal_ptr + peer, 1, scope="sys", semantic="acquire", wait_value=call)
    dst = dl.symm_at(out_ptr, peer) + me * M * N

    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    # a while loop, not `range` with runtime bounds: Triton 3.6's interpreter fails on the latter with
    # NumPy >= 2.4 (triton-lang/triton#9171)
    t = tl.program_id(1)
    while t < tiles:
        rows = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        tl.store(dst + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        t += CHUNKS
    # release: the tiles above are visible on the peer before the counter moves
    dl.notify(signal_ptr + world + me, peer, signal=1, sig_op="add", comm_scope="intra_node")


@triton.jit
def ag_wait_kernel(signal_ptr, call, CHUNKS: tl.constexpr):
    """Wait until every source rank's arrival counter reached ``call * CHUNKS``."""
    world = dl.num_ranks()
    dl.wait(signal_ptr + world, world, scope="sys", semantic="acquire", wait_value=call * CHUNKS)


class AllGather:
    """All-gather of (M, N) tensors into a reusable symmetric (world * M, N) buffer.

    Made once (collective: every rank, same arguments), called many times. The tensor a call returns is
    ``self.out`` and stays valid until this rank's next call.
    """

    def __init__(self, M: int, N: int, dtype: torch.dtype, *, chunks: int, block_m: int, block_n: int,
                 num_warps: int = 4):
        self.world = triton_dist.current_world()
        if self.world.world_size * M * N >= 2**31:
            raise ValueError(f"AllGather: world * M * N must be < 2**31 (the kernel's offsets are int32), got "
                             f"{self.world.world_size} * {M} * {N}")
        self.M, self.N, self.dtype = M, N, dtype
        self.chunks, self.block_m, self.block_n, self.num_warps = chunks, block_m, block_n, num_warps
        self.out = triton_dist.empty((self.world.world_size * M, N), dtype)
        self.signals = triton_dist.zeros((2, self.world.world_size), torch.int32)  # ready[], arrived[]
        self.call = 0
        triton_dist.barrier()  # every rank's signals are zero before anyone notifies

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != (self.M, self.N) or x.dtype != self.dtype or not x.is_contiguous():
            raise ValueError(f"AllGather: expected a contiguous ({self.M}, {self.N}) {self.dtype} tensor, got "
                             f"{tuple(x.shape)} {x.dtype} (contiguous={x.is_contiguous()})")
        if x.device != self.out.device:
            raise ValueError(f"AllGather: x is on {x.device}, expected {self.out.device}")
        self.call += 1
        w = self.world.world_size
        ag_ready_kernel[(w,)](self.signals, self.call)
        ag_push_kernel[(w, self.chunks)](x, self.out, self.signals, self.M, self.N, self.call, CHUNKS=self.chunks,
                                         BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps)
        ag_wait_kernel[(1,)](self.signals, self.call, CHUNKS=self.chunks)
        return self.out

    def close(self) -> None:
        triton_dist.free(self.signals)
        triton_dist.free(self.out)


# torch 2.13 renamed all_gather_into_tensor (same arguments) and warns on the old name
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_reference(x: torch.Tensor, group) -> torch.Tensor:
    """What :class:`AllGather` must produce, from torch.distributed (NCCL on GPUs, gloo in the CPU world)."""
    out = torch.empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    _all_gather_into_tensor(out, x, group=group)
    return out


def main() -> None:
    world = triton_dist.init()
    gpu = world.device.type == "cuda"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # bf16 is for GPUs only: Triton's interpreter gets bf16 wrong, so the CPU world uses float32
    p.add_argument("--rows", type=int, default=4000 if gpu else 37, help="M, rows of x per rank")
    p.add_argument("--cols", type=int, default=4000 if gpu else 51, help="N, columns of x")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--iters", type=int, default=20, help="timed calls per provider (GPUs only)")
    p.add_argument("--chunks", type=int, default=None, help="programs per peer in the push kernel")
    p.add_argument("--block-m", type=int, default=None, help="tile rows (a power of two)")
    p.add_argument("--block-n", type=int, default=None, help="tile columns (a power of two)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    W = world.world_size

    if gpu:  # about one program per SM in all; wide tiles for 16-byte accesses
        chunks = max(1, world.num_sms // W)
        block_m, block_n = 32, 256
    else:  # the interpreter costs ~0.1 ms per op per program: few programs, one big tile each
        chunks, block_m, block_n = 1, triton.next_power_of_2(args.rows), triton.next_power_of_2(args.cols)
    ag = AllGather(args.rows, args.cols, dtype, chunks=args.chunks or chunks, block_m=args.block_m or block_m,
                   block_n=args.block_n or block_n)

    def check(calls: int, seed: int) -> int:
        """Run ``calls`` checked calls on fresh data; return how many differ on any rank."""
        bad = 0
        for i in range(calls):  # the same buffers every time: the call number is the wait value
            g = torch.Generator().manual_seed(7919 * (seed + i) + world.rank)
            x = torch.randn((args.rows, args.cols), generator=g).to(dtype).to(world.device)
            ag.out.fill_(float("nan"))  # poison: safe here, nobody writes our out before our next ready kernel
            bad += not torch.equal(ag(x), all_gather_reference(x, world.group))
        failures = torch.tensor([bad], dtype=torch.int64)
        dist.all_reduce(failures, group=world.group)  # a CPU tensor: gloo on every backend
        return int(failures.item())

    failures, timing = check(3, seed=0), None
    if gpu and not world.shared_gpu and not failures:  # a shared GPU's times are not performance
        x = torch.randn((args.rows, args.cols), device=world.device).to(dtype)
        ours = median_ms(lambda: ag(x), iters=args.iters, group=world.group)
        out = torch.empty_like(ag.out)
        nccl = median_ms(lambda: _all_gather_into_tensor(out, x, group=world.group), iters=args.iters,
                         group=world.group)
        timing = ours, nccl
        failures = check(3, seed=100)  # still exact after the timed calls reused the buffers
    rows = [("world size", W), ("backend", world.backend), ("shape per rank", f"({args.rows}, {args.cols})"),
            ("output", f"({W * args.rows}, {args.cols})"), ("dtype", str(dtype).replace("torch.", "")),
            ("calls on the same buffers", ag.call),
            ("match (== torch.distributed, bit for bit)", "no" if failures else "yes")]
    if gpu and world.shared_gpu:
        rows.append(("timing", "skipped: ranks share a GPU, so times are not performance"))
    if timing:
        ours, nccl = timing
        rows += [("triton-dist median", f"{ours:.3f} ms"), ("NCCL all_gather_into_tensor median", f"{nccl:.3f} ms"),
                 ("NCCL time / ours", f"{nccl / ours:.2f}"), ("card", torch.cuda.get_device_name(world.device))]
    if world.rank == 0:
        width = max(len(k) for k, _ in rows)
        print("intra-node all-gather (tutorials/02_intra_node_allgather.py)")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    ag.close()
    triton_dist.finalize()
    if failures:
        raise RuntimeError(f"all-gather result differs from torch.distributed in {failures} (rank, call) pairs")


if __name__ == "__main__":
    main()
