"""``init()`` / ``finalize()`` CYCLES times in one process (default 10), with ops in every world, each checked
against its torch reference; prints one line per rank at the end. Works on the CPU world and on GPUs."""
import os
import sys

import torch

import triton_dist
from triton_dist import ops
from triton_dist.kernels import all_gather as ag
from triton_dist.kernels import all_reduce as ar
from triton_dist.kernels import all_to_all as a2a
from triton_dist.kernels import ag_gemm as agm

cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for cycle in range(cycles):
    world = triton_dist.init()
    g = torch.Generator().manual_seed(100 * cycle + world.rank)
    dtype = torch.float32
    x = (torch.randn(7 + cycle, 33, generator=g) + 0.5).to(world.device)  # a new size each cycle: new contexts
    torch.testing.assert_close(ops.all_reduce(x), ar.all_reduce_reference(x))
    assert torch.equal(ops.all_gather(x), ag.all_gather_reference(x))
    y = torch.randn(world.world_size * 3, 5, generator=g).to(world.device)
    assert torch.equal(ops.all_to_all(y), a2a.all_to_all_reference(y))
    a = torch.randn(4, 16, generator=g).to(world.device)
    b = torch.randn(16, 8, generator=g).to(world.device)
    torch.testing.assert_close(ops.ag_gemm(a, b), agm.ag_gemm_reference(a, b), rtol=1e-4, atol=1e-4)
    assert ops._contexts and a2a._default
    triton_dist.finalize()
    assert not triton_dist.is_initialized() and not ops._contexts and not a2a._default, "op contexts outlived finalize"
os.write(1, f"rank {os.environ['RANK']}: {cycles} worlds ok\n".encode())
