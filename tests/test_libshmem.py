"""NVSHMEM-style device API, one kernel source everywhere: the CPU world (interpreter bodies); on GPUs backend "nvshmem"
(NVSHMEM's libnvshmem_device.bc, one GPU per rank) and backend "cuda" (triton_dist_shmem.ll over CUDA IPC, also with
ranks sharing a GPU)."""
import os

import pytest
import torch
import triton
import triton.language as tl

import triton_dist
from triton_dist.language import libshmem_device as shmem

from _util import poison, rand, sync, this_world
from conftest import WORLD_SIZES, get_world

BACKEND = os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu")


SHMEM_BACKENDS = ["cpu"] if BACKEND == "cpu" else ["nvshmem", "cuda"]


@pytest.fixture(params=[(n, b) for n in WORLD_SIZES for b in SHMEM_BACKENDS],
                ids=lambda p: f"{p[0]}pes" + ("" if p[1] == "cpu" else f"-{p[1]}"))
def pes(request, worlds):
    """A world of every backend that runs libshmem_device kernels here."""
    n, backend = request.param
    return get_world(worlds, n, backend=backend)


@triton.jit
def _put_signal_ring_kernel(dst_ptr, src_ptr, sig_ptr, out_ptr, nbytes, epoch, NBLOCKS: tl.constexpr):
    """Each program puts one slice of my data to the right neighbour with a signal, then waits for the left's."""
    me = shmem.my_pe()
    npes = shmem.n_pes()
    right = (me + 1) % npes
    pid = tl.program_id(0)
    chunk = nbytes // NBLOCKS
    shmem.putmem_signal_block(dst_ptr + pid * chunk, src_ptr + pid * chunk, chunk, sig_ptr + pid, epoch,
                              shmem.NVSHMEM_SIGNAL_SET, right)
    seen = shmem.signal_wait_until(sig_ptr + pid, shmem.NVSHMEM_CMP_EQ, epoch)
    tl.store(out_ptr + pid, seen.to(tl.int64))


@triton.jit
def _get_kernel(dst_ptr, src_ptr, nbytes):
    me = shmem.my_pe()
    left = (me + shmem.n_pes() - 1) % shmem.n_pes()
    shmem.getmem_block(dst_ptr, src_ptr, nbytes, left)
    shmem.quiet()


@triton.jit
def _barrier_kernel(buf_ptr, out_ptr):
    """Write my rank into every peer's slot with remote_ptr + store, barrier_all, read all slots back."""
    me = shmem.my_pe()
    npes = shmem.n_pes()
    for pe in range(npes):
        tl.store(shmem.remote_ptr(buf_ptr + me, pe), me + 10)
    shmem.fence()
    shmem.barrier_all_block()
    for pe in range(npes):
        tl.store(out_ptr + pe, tl.load(buf_ptr + pe))


@triton.jit
def _signal_add_kernel(sig_ptr, out_ptr):
    shmem.signal_op(sig_ptr, 2, shmem.NVSHMEM_SIGNAL_ADD, 0)
    if shmem.my_pe() == 0:
        seen = shmem.signal_wait_until(sig_ptr, shmem.NVSHMEM_CMP_GE, 2 * shmem.n_pes())
        tl.store(out_ptr, seen.to(tl.int64))


def _put_signal_ring(nbytes, seed):
    w = this_world()
    nblocks = 4
    src = triton_dist.empty((nbytes,), torch.uint8)
    dst = triton_dist.empty((nbytes,), torch.uint8)
    sig = triton_dist.zeros((nblocks,), torch.uint64)
    triton_dist.barrier()
    left = (w.rank - 1) % w.world_size
    for epoch in (1, 2):
        src.copy_(rand((nbytes,), torch.uint8, seed + 17 * epoch + w.rank, w.device))
        dst.fill_(0xEE)
        out = torch.full((nblocks,), -1, dtype=torch.int64, device=w.device)
        triton_dist.barrier()
        _put_signal_ring_kernel[(nblocks,)](dst, src, sig, out, nbytes, epoch, NBLOCKS=nblocks)
        sync()
        triton_dist.barrier()
        assert torch.equal(dst, rand((nbytes,), torch.uint8, seed + 17 * epoch + left, w.device))
        assert out.tolist() == [epoch] * nblocks
    for t in (sig, dst, src):
        triton_dist.free(t)
    return True


def test_put_with_signal_exchange(pes, seed):
    assert all(pes.run(_put_signal_ring, 4 * 1000, seed))


def _get(seed):
    w = this_world()
    n = 3000
    src = triton_dist.empty((n,), torch.float16)
    src.copy_(rand((n,), torch.float16, seed + w.rank, w.device))
    dst = poison(triton_dist.empty((n,), torch.float16))
    triton_dist.barrier()
    _get_kernel[(1,)](dst, src, n * 2)
    sync()
    left = (w.rank - 1) % w.world_size
    ok = torch.equal(dst, rand((n,), torch.float16, seed + left, w.device))
    triton_dist.barrier()
    triton_dist.free(dst)
    triton_dist.free(src)
    return ok


def test_getmem(pes, seed):
    assert all(pes.run(_get, seed))


def _barrier_all():
    w = this_world()
    buf = triton_dist.zeros((w.world_size,), torch.int32)
    out = torch.full((w.world_size,), -1, dtype=torch.int32, device=w.device)
    triton_dist.barrier()
    _barrier_kernel[(1,)](buf, out)
    sync()
    triton_dist.barrier()
    triton_dist.free(buf)
    return out.tolist()


def test_barrier_all_orders_remote_stores(pes):
    n = pes.world_size
    assert pes.run(_barrier_all) == [[pe + 10 for pe in range(n)]] * n


def _signal_add():
    w = this_world()
    sig = triton_dist.zeros((1,), torch.uint64)
    out = torch.full((1,), -1, dtype=torch.int64, device=w.device)
    triton_dist.barrier()
    _signal_add_kernel[(1,)](sig, out)
    sync()
    triton_dist.barrier()
    triton_dist.free(sig)
    return out.item()


def test_signal_op_add(pes):
    got = pes.run(_signal_add)
    assert got[0] == 2 * pes.world_size and got[1:] == [-1] * (pes.world_size - 1)
