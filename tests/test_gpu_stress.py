"""GPU-only tests (bf16, memory-ordering stress). Deselected by default; `bash scripts/gpu_suite.sh` runs them."""
import pytest
import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from _util import sync, this_world
from test_language import _push_pull

pytestmark = pytest.mark.gpu


def test_bf16_peer_writes_and_reads_exact(world, seed):
    assert all(world.run(_push_pull, 4099, torch.bfloat16, seed))


@triton.jit
def _stress_kernel(buf_ptr, sig_ptr, ack_ptr, err_ptr, iters, BLOCK: tl.constexpr):
    """Each program streams `iters` messages to the right neighbour through one slot: write data, notify; the
    neighbour waits, checks every element, and acks so the slot can be reused. Any reordering of data and signal
    shows up as a wrong element."""
    pid = tl.program_id(0)
    me = dl.rank()
    world = dl.num_ranks()
    right = (me + 1) % world
    left = (me + world - 1) % world
    offs = tl.arange(0, BLOCK)
    slot = buf_ptr + pid * BLOCK
    errors = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(1, iters + 1):
        if i > 1:
            dl.wait(ack_ptr + pid, 1, "sys", "acquire", i - 1)
        tl.store(dl.symm_at(slot, right) + offs, i * 4096 + pid * 7 + offs)
        dl.notify(sig_ptr + pid, right, i, "set", "intra_node")
        token = dl.wait(sig_ptr + pid, 1, "sys", "acquire", i)
        got = tl.load(dl.consume_token(slot, token) + offs)
        errors += (got != i * 4096 + pid * 7 + offs).to(tl.int32)
        dl.notify(ack_ptr + pid, left, i, "set", "intra_node")
    tl.store(err_ptr + pid, tl.sum(errors, axis=0))


def _stress(iters, programs):
    w = this_world()
    block = 1024
    buf = triton_dist.zeros((programs * block,), torch.int32)
    sig = triton_dist.zeros((programs,), torch.int32)
    ack = triton_dist.zeros((programs,), torch.int32)
    err = torch.full((programs,), -1, dtype=torch.int32, device=w.device)
    triton_dist.barrier()
    _stress_kernel[(programs,)](buf, sig, ack, err, iters, BLOCK=block, num_warps=4)
    sync()
    triton_dist.barrier()
    for t in (ack, sig, buf):
        triton_dist.free(t)
    return err.tolist()


def test_notify_wait_stress_10k_messages(world):
    for errors in world.run(_stress, 10_000, 8, timeout=300):
        assert errors == [0] * 8
