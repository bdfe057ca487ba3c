"""Micro-benchmarks of the primitives on GPUs: ``triton-dist bench primitives [--out DIR]``.

* ``signal_rtt``: ranks (0,1), (2,3), ... ping-pong a signal ``--iters`` times inside one kernel (one program of one
  warp per rank); round trip = kernel time / iters. Flavours: ``release_acquire`` (``dl.notify`` =
  ``st.release.sys`` + ``dl.wait`` acquire), ``relaxed`` (``st.relaxed.sys`` + ``ld.relaxed.sys`` spin),
  ``volatile`` (``st.volatile`` + ``ld.volatile`` spin), ``atomic`` (``atom.exch.release.sys`` + acquire spin),
  ``release_relaxed_fence`` (``dl.notify`` + relaxed spin + one ``fence.acq_rel.sys``).
* ``peer_put`` / ``peer_get``: every rank at once pushes to / pulls from rank+1 with a persistent copy kernel
  (one program per SM, 16-byte accesses); GB/s per GPU = bytes / time. Baseline ``copy_engine``: a peer
  ``Tensor.copy_`` (cudaMemcpy over NVLink).

Rows go to ``<out>/<card>.jsonl`` (see ``harness.py``); a table is printed on rank 0.
"""
from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.bench.harness import Recorder, time_op

FLAVOURS = ("release_acquire", "release_relaxed_fence", "relaxed", "volatile", "atomic")


@triton.jit
def _send(sig_ptr, peer, value, FLAVOUR: tl.constexpr):
    if FLAVOUR == "release_acquire" or FLAVOUR == "release_relaxed_fence":
        dl.notify(sig_ptr, peer, value, "set", "intra_node")
    elif FLAVOUR == "relaxed":
        dl.st(dl.symm_at(sig_ptr, peer), value, "sys", "relaxed")
    elif FLAVOUR == "volatile":
        dl.st(dl.symm_at(sig_ptr, peer), value, "sys", "volatile")
    else:
        dl.atomic_xchg(dl.symm_at(sig_ptr, peer), value, "sys", "release")


@triton.jit
def _recv(sig_ptr, value, FLAVOUR: tl.constexpr):
    if FLAVOUR == "relaxed":
        dl.wait(sig_ptr, 1, "sys", "relaxed", value)
    elif FLAVOUR == "release_relaxed_fence":
        dl.wait(sig_ptr, 1, "sys", "relaxed", value)
        dl.fence("sys", "acq_rel")
    elif FLAVOUR == "volatile":
        dl.wait(sig_ptr, 1, "sys", "volatile", value)
    else:
        dl.wait(sig_ptr, 1, "sys", "acquire", value)


@triton.jit
def _pingpong_kernel(sig_ptr, base, iters, FLAVOUR: tl.constexpr):
    me = dl.rank()
    peer = me ^ 1
    if peer < dl.num_ranks():
        for i in range(1, iters + 1):
            if me % 2 == 0:
                _send(sig_ptr, peer, base + i, FLAVOUR)
                _recv(sig_ptr, base + i, FLAVOUR)
            else:
                _recv(sig_ptr, base + i, FLAVOUR)
                _send(sig_ptr, peer, base + i, FLAVOUR)


@triton.jit
def _copy_kernel(dst_ptr, src_ptr, n, peer, PUSH: tl.constexpr, BLOCK: tl.constexpr):
    """Persistent copy of n int32 words between this rank and ``peer`` (push: into peer; pull: from peer)."""
    pid = tl.program_id(0)
    if PUSH:
        dst = dl.symm_at(dst_ptr, peer)
        src = src_ptr
    else:
        dst = dst_ptr
        src = dl.symm_at(src_ptr, peer)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def bench_signal_rtt(rec: Recorder, iters: int, samples: int) -> None:
    world = triton_dist.current_world()
    sig = triton_dist.zeros((1,), torch.int32)
    triton_dist.barrier()
    for flavour in FLAVOURS:
        count = [0]

        def run():
            _pingpong_kernel[(1,)](sig, count[0] * iters, iters, FLAVOUR=flavour, num_warps=1)
            count[0] += 1

        times = time_op(run, iters=samples, warmup=2, group=world.group)
        rtt = [t / iters for t in times]
        rec.add("signal_rtt", f"iters={iters}", "int32", f"triton_dist:{flavour}", rtt)
    triton_dist.free(sig)


def bench_peer_copy(rec: Recorder, sizes: list[int], samples: int) -> None:
    world = triton_dist.current_world()
    peer = (world.rank + 1) % world.world_size
    sms = torch.cuda.get_device_properties(world.device).multi_processor_count
    for nbytes in sizes:
        n = nbytes // 4

        def data(rank):
            g = torch.Generator(device=world.device).manual_seed(1000 + rank)
            return torch.randint(-(1 << 30), 1 << 30, (n,), dtype=torch.int32, device=world.device, generator=g)

        local = data(world.rank)
        sym = triton_dist.empty((n,), torch.int32)
        sym.fill_(-7)
        triton_dist.barrier()
        block = 4096
        grid = (min(sms, triton.cdiv(n, block)),)
        inner = 10 if nbytes < (16 << 20) else 1
        put = lambda: _copy_kernel[grid](sym, local, n, peer, PUSH=True, BLOCK=block, num_warps=8)  # noqa: E731
        get = lambda: _copy_kernel[grid](local, sym, n, peer, PUSH=False, BLOCK=block, num_warps=8)  # noqa: E731
        peer_sym = triton_dist.peer_view(sym, peer)
        ce = lambda: peer_sym.copy_(local)  # noqa: E731
        rec.add("peer_put", f"nbytes={nbytes}", "int32", "triton_dist", time_op(put, iters=samples, group=world.group, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        if not torch.equal(sym, data((world.rank - 1) % world.world_size)):
            raise RuntimeError(f"peer_put of {nbytes} bytes delivered wrong data on rank {world.rank}")
        local.fill_(-7)
        rec.add("peer_get", f"nbytes={nbytes}", "int32", "triton_dist", time_op(get, iters=samples, group=world.group, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        if not torch.equal(local, data(world.rank)):  # our heap holds the left rank's data; we pulled the right's
            raise RuntimeError(f"peer_get of {nbytes} bytes fetched wrong data on rank {world.rank}")
        rec.add("peer_put", f"nbytes={nbytes}", "int32", "copy_engine", time_op(ce, iters=samples, group=world.group, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        triton_dist.free(sym)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("bench", "results"), help="directory of <card>.jsonl")
    ap.add_argument("--iters", type=int, default=5000, help="ping-pong round trips per sample")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--sizes", default="65536,1048576,16777216,268435456", help="peer copy sizes in bytes")
    args = ap.parse_args(argv)
    world = triton_dist.init()
    if world.interpreted:
        raise SystemExit("triton-dist bench primitives needs GPUs (the CPU world has no meaningful timings)")
    rec = Recorder(args.out, world.world_size, world.rank)
    bench_signal_rtt(rec, args.iters, args.samples)
    bench_peer_copy(rec, [int(s) for s in args.sizes.split(",")], args.samples)
    path = rec.write()
    if world.rank == 0:
        print(rec.table())
        print(f"rows appended to {path}")
    triton_dist.finalize()


if __name__ == "__main__":
    main()
