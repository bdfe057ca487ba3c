"""Rank 1 raises after ``init``; the other ranks then wait in a barrier that never completes."""
import _pids

_pids.record()

import triton_dist  # noqa: E402

world = triton_dist.init()
if world.rank == 1:
    raise ValueError("boom from rank 1")
triton_dist.barrier()
triton_dist.finalize()
