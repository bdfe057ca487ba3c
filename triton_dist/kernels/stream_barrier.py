"""Device barrier on the current stream for worlds whose arena brings none (ranks sharing a GPU over CUDA IPC).

Signal protocol: int64 slots in the reserved start of every rank's heap (``heap.STREAM_BARRIER_SLOTS``: slot ``r``
holds rank ``r``'s last barrier epoch) and this rank's own epoch counter (``heap.STREAM_BARRIER_COUNTER``), both
zeroed by ``init``. One program: bump the counter to ``e``, write ``e`` into slot ``me`` of every rank with release
semantics, then wait until every slot of this rank's heap is ``>= e`` (acquire). Epochs only grow, so a fast rank
already at ``e + 1`` satisfies a wait for ``e``, and back-to-back barriers (and CUDA-graph replays) need no reset.
The waits are the hang watchdog's, so a rank that never arrives is named.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import triton_dist.language as dl
from triton_dist.runtime.heap import STREAM_BARRIER_COUNTER, STREAM_BARRIER_SLOTS


@triton.jit
def _stream_barrier_kernel(slots_ptr, counter_ptr):
    me = dl.rank()
    e = tl.load(counter_ptr) + 1
    tl.debug_barrier()  # every thread read the counter before one overwrites it (see _common.take_epoch)
    tl.store(counter_ptr, e)
    for peer in range(dl.num_ranks()):
        dl.notify(slots_ptr + me, peer, e, sig_op="set", comm_scope="intra_node")
    dl.wait(slots_ptr, dl.num_ranks(), "sys", "acquire", e, cmp="ge")


def stream_barrier(world) -> None:
    """Enqueue the barrier on the current stream of ``world``'s device; returns at once (no host sync)."""
    local = world.heap.local
    slots = local[STREAM_BARRIER_SLOTS:STREAM_BARRIER_SLOTS + 8 * world.world_size].view(torch.int64)
    counter = local[STREAM_BARRIER_COUNTER:STREAM_BARRIER_COUNTER + 8].view(torch.int64)
    _stream_barrier_kernel[(1,)](slots, counter, num_warps=1)
