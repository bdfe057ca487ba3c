"""Tutorial 5: a low-latency all-reduce that sends its flags inside the data ("LL" protocol).

Run it with ``triton-dist run -n 4 tutorials/05_ll_allreduce.py`` (any ``-n`` >= 2; GPUs when present, otherwise a
CPU world of processes running the kernel under Triton's interpreter).

Tutorial 1 moved data with a store, then a *release* notify, then an *acquire* wait: three steps, and the release
costs a system-scope fence (about 1.5-2 us on H100 over NVLink, docs/perf/NOTES.md). For a few KiB that fence is
most of the time. The LL idea: make the flag part of every word, so that the data cannot arrive without it.

* Each 32-bit word of ``x`` travels as one 64-bit word ``(epoch << 32) | word``, written with a single 8-byte store.
  An aligned 8-byte store is *single-copy atomic*: a reader sees the old 8 bytes or the new 8 bytes, never half.
  So if the high half reads ``epoch``, the low half is this call's data. No fence, no separate signal.
* The receiver polls its own buffer (local memory) until every word of a tile carries this call's epoch.
* Flags are call numbers (1, 2, 3, ...), so the buffer never needs clearing: a word left from call ``e - 2`` says
  ``e - 2`` and does not match.
* Two buffers, by the parity of the call: a rank can only start call ``e + 2`` after it received every peer's data
  of call ``e + 1``, which each peer sends only after finishing call ``e`` (i.e. after reading our call-``e``
  words). So writing parity ``e % 2`` again in call ``e + 2`` never overwrites words a peer still needs.

::

    rank r                                            rank q (every q, r itself included)
    ------                                            -----------------------------------
    w = x[i] (32 bits)
    st.volatile.b64 [ll_q[e%2][r][i]], (e<<32)|w  -->  ll_q[e%2][r][i]
                                                      spin: load ll_q[e%2][r][tile] until all high halves == e
                                                      sum the low halves over r = 0..world-1 (rank order)

The price is twice the bytes on the wire, so LL is for small messages; ``triton_dist.ops.all_reduce`` uses it up to
256 KiB (``method="ll"``), with the same packing, a vector poll of a whole tile, and ``dl.wait_flagged`` (a
word-by-word wait with the hang watchdog) as fallback. This tutorial keeps the kernel small: fp32 data (one element
per word), one program per rank, the poll written as a plain loop over a tile.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl


@triton.jit
def ll_all_reduce_kernel(x_ptr, ll_ptr, out_ptr, n, epoch, BLOCK: tl.constexpr):
    """Sum ``x`` (fp32, ``n`` <= ``BLOCK``) over the ranks. ``ll_ptr``: the symmetric int64 buffer of
    ``2 x world x BLOCK`` words. One program per rank."""
    me = dl.rank()
    world = dl.num_ranks()
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    parity = epoch % 2

    # send: my words, each with the epoch in its high half, into slot [parity][me] of every rank
    bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.int32, bitcast=True)
    packed = (tl.full([BLOCK], epoch, tl.int64) << 32) | (bits.to(tl.int64) & 0xFFFFFFFF)
    slot = ll_ptr + (parity * world + me) * BLOCK + offs
    for peer in range(world):
        dl.st(dl.symm_at(slot, peer), packed, "sys", "volatile")  # one 8-byte store per word

    # receive: poll my own buffer until each sender's tile carries this epoch, then sum in rank order
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for src in range(world):
        words = ll_ptr + (parity * world + src) * BLOCK + offs
        v = tl.load(words, volatile=True)
        while tl.min(((v >> 32).to(tl.int32) == epoch).to(tl.int32), axis=0) == 0:
            v = tl.load(words, volatile=True)
        acc += v.to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, acc, mask=mask)


def data_of(rank: int, n: int, call: int, device) -> torch.Tensor:
    """What ``rank`` contributes in ``call``: random, reproducible on every rank, never all zeros."""
    g = torch.Generator().manual_seed(7919 * call + rank)
    return torch.randn(n, generator=g).to(device)


def main() -> None:
    world = triton_dist.init()
    if world.world_size < 2:
        raise SystemExit("run with at least 2 ranks: triton-dist run -n 2 tutorials/05_ll_allreduce.py")
    n, calls = 1000, 6  # not a power of two; more calls than buffers, so both parities are reused
    block = triton.next_power_of_2(n)
    ll = triton_dist.zeros((2 * world.world_size * block,), torch.int64)
    triton_dist.barrier()  # every rank's buffer is zero before anyone writes into it

    worst = 0.0
    for call in range(1, calls + 1):  # back to back: no barrier between calls, the parities make reuse safe
        x = data_of(world.rank, n, call, world.device)
        out = torch.full((n,), float("nan"), device=world.device)
        ll_all_reduce_kernel[(1,)](x, ll, out, n, call, BLOCK=block)
        ref = sum(data_of(r, n, call, "cpu") for r in range(world.world_size))  # rank order, like the kernel
        worst = max(worst, (out.cpu() - ref).abs().max().item())

    errors = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=world.group)
    ok = errors.item() <= 1e-5
    if world.rank == 0:
        print(f"LL all-reduce: {world.world_size} ranks, backend {world.backend}, {calls} calls of {n} fp32")
        print(f"largest error vs torch: {errors.item():.3g}")
        print(f"match: {'yes' if ok else 'no'}")
    triton_dist.barrier()
    triton_dist.free(ll)
    triton_dist.finalize()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
