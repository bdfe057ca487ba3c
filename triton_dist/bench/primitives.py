"""Micro-benchmarks of the primitives on GPUs: ``triton-dist bench primitives [--out DIR]``.

::

    triton-dist bench primitives [-n N] [--iters 5000] [--samples 20] [--sizes 65536,...] [--out DIR]
    triton-dist bench primitives -n 2 --mode cpu -- --smoke     # CPU world: a plumbing check, no timings

* ``signal_rtt``: ranks (0,1), (2,3), ... ping-pong a signal ``--iters`` times inside one kernel (one program of one
  warp per rank); round trip = kernel time / iters. Flavours: ``release_acquire`` (``dl.notify`` =
  ``st.release.sys`` + ``dl.wait`` acquire), ``relaxed`` (``st.relaxed.sys`` + ``ld.relaxed.sys`` spin),
  ``volatile`` (``st.volatile`` + ``ld.volatile`` spin), ``atomic`` (``atom.exch.release.sys`` + acquire spin),
  ``release_relaxed_fence`` (``dl.notify`` + relaxed spin + one ``fence.acq_rel.sys``).
* ``peer_put`` / ``peer_get``: every rank at once pushes to / pulls from rank+1 with a persistent copy kernel
  (one program per SM, 16-byte accesses); GB/s per GPU = bytes / time. Baseline ``copy_engine``: a peer
  ``Tensor.copy_`` (cudaMemcpy over NVLink). The copy grid has at most :attr:`World.num_sms` programs (a shared-GPU
  world's share of the SMs).

World size 1 (``-n 1``): no signal_rtt (it needs pairs); rank 0 copies within its own heap, the no-communication
reference. In a shared-GPU world (``--share-gpus``) a banner says the times are not performance and every row is
marked ``shared_gpu``. ``--smoke`` runs tiny defaults (3 round trips, 2 samples, 4 KiB and 64 KiB) in the CPU world
with wall-clock timing; rows are written only with an explicit ``--out``.

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
from triton_dist.bench.harness import Recorder, time_op, wall_times
from triton_dist.bench.report import announce_shared_gpu, world_caveats

FLAVOURS = ("release_acquire", "release_relaxed_fence", "relaxed", "volatile", "atomic")
SHARED_NO_MPS_ITERS = 100  # default --iters in a shared-GPU world without MPS (a round trip per time slice)


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


def _time(fn, samples: int, *, warmup: int = 5, inner: int = 1) -> list[float]:
    """The slowest rank's per-call microseconds of ``fn``: :func:`time_op` on GPUs, wall clock (one call per sample,
    ``inner`` ignored) in the CPU world."""
    world = triton_dist.current_world()
    if world.interpreted:
        return wall_times(fn, samples, world.group)
    return time_op(fn, iters=samples, warmup=warmup, group=world.group, inner=inner)


def bench_signal_rtt(rec: Recorder, iters: int, samples: int) -> None:
    world = triton_dist.current_world()
    sig = triton_dist.zeros((1,), torch.int32)
    triton_dist.barrier()
    for flavour in FLAVOURS:
        count = [0]

        def run():
            _pingpong_kernel[(1,)](sig, count[0] * iters, iters, FLAVOUR=flavour, num_warps=1)
            count[0] += 1

        times = _time(run, samples, warmup=2)
        rtt = [t / iters for t in times]
        rec.add("signal_rtt", f"iters={iters}", "int32", f"triton_dist:{flavour}", rtt)
    triton_dist.free(sig)


def bench_peer_copy(rec: Recorder, sizes: list[int], samples: int) -> None:
    world = triton_dist.current_world()
    peer = (world.rank + 1) % world.world_size
    sms = world.num_sms  # a shared-GPU world's share of the SMs; 1 in the CPU world
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
        rec.add("peer_put", f"nbytes={nbytes}", "int32", "triton_dist", _time(put, samples, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        if not torch.equal(sym, data((world.rank - 1) % world.world_size)):
            raise RuntimeError(f"peer_put of {nbytes} bytes delivered wrong data on rank {world.rank}")
        local.fill_(-7)
        rec.add("peer_get", f"nbytes={nbytes}", "int32", "triton_dist", _time(get, samples, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        if not torch.equal(local, data(world.rank)):  # our heap holds the left rank's data; we pulled the right's
            raise RuntimeError(f"peer_get of {nbytes} bytes fetched wrong data on rank {world.rank}")
        rec.add("peer_put", f"nbytes={nbytes}", "int32", "copy_engine", _time(ce, samples, inner=inner),
                nbytes=nbytes)
        triton_dist.barrier()
        triton_dist.free(sym)


def plan_notes(world_size: int) -> tuple[bool, list[str]]:
    """Whether signal_rtt runs at this world size (it needs pairs of ranks) and notes on what the sizes change."""
    notes = []
    if world_size < 2:
        notes.append("signal_rtt not run: it needs pairs of ranks (0-1, 2-3, ...); world size 1 has none")
        notes.append("peer_put / peer_get at world size 1: rank 0 copies within its own heap")
    elif world_size % 2:
        notes.append(f"signal_rtt: rank {world_size - 1} has no partner and idles")
    return world_size >= 2, notes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="triton-dist bench primitives", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="directory of <card>.jsonl [default: bench/results; with --smoke: write nothing]")
    ap.add_argument("--iters", type=int, default=None,
                    help=f"ping-pong round trips per sample [default: 5000; --smoke: 3; a shared-GPU world without "
                         f"MPS: {SHARED_NO_MPS_ITERS}]")
    ap.add_argument("--samples", type=int, default=None, help="[default: 20; --smoke: 2]")
    ap.add_argument("--sizes", default=None,
                    help="peer copy sizes in bytes [default: 65536,1048576,16777216,268435456; --smoke: 4096,65536]")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny defaults, allowed in the CPU world (wall-clock timing): checks the plumbing only")
    args = ap.parse_args(argv)
    samples = args.samples if args.samples is not None else (2 if args.smoke else 20)
    try:
        sizes = [int(s) for s in (args.sizes or ("4096,65536" if args.smoke else
                                                 "65536,1048576,16777216,268435456")).split(",")]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated byte counts, got {args.sizes!r}")
    if (args.iters is not None and args.iters < 1) or samples < 1 or min(sizes) < 4 or any(s % 4 for s in sizes):
        ap.error("--iters and --samples must be positive, --sizes multiples of 4 bytes")
    world = triton_dist.init()
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench primitives needs GPUs (the CPU world has no meaningful timings; --smoke "
                         "runs tiny sizes there as a plumbing check)")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    rtt, notes = plan_notes(world.world_size)
    iters = args.iters
    if iters is None:
        iters = 3 if args.smoke else SHARED_NO_MPS_ITERS if world.shared_gpu and not world.mps else 5000
        if iters == SHARED_NO_MPS_ITERS and rtt:
            notes.append(f"signal_rtt: {iters} round trips per sample (--iters overrides): without MPS the ranks "
                         "time-slice the GPU, so every round trip waits for the partner's time slice")
    if rtt:
        bench_signal_rtt(rec, iters, samples)
    bench_peer_copy(rec, sizes, samples)
    path = rec.write() if (args.out or not args.smoke) else None
    if world.rank == 0:
        print(rec.table(notes + world_caveats(world)))
        if path:
            print(f"rows appended to {path}")
    triton_dist.finalize()


if __name__ == "__main__":
    main()
