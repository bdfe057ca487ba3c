"""Every rank fills a symmetric tensor, then checks its right neighbour's values through ``peer_view``."""
import os

import _pids

_pids.record()

import torch  # noqa: E402

import triton_dist  # noqa: E402

world = triton_dist.init()
n = 37  # an odd size on purpose
t = triton_dist.empty((n,), torch.int32)
t.copy_(torch.arange(n, dtype=torch.int32) + 1000 * (world.rank + 1))
triton_dist.barrier()
peer = (world.rank + 1) % world.world_size
expected = torch.arange(n, dtype=torch.int32) + 1000 * (peer + 1)
got = triton_dist.peer_view(t, peer).clone()
if not torch.equal(got, expected):
    raise SystemExit(f"rank {world.rank}: peer {peer} holds {got.tolist()}, expected {expected.tolist()}")
os.write(1, f"rank {world.rank} ok\n".encode())  # one write: lines of ranks never interleave
triton_dist.finalize()
