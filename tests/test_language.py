"""Device primitives of triton_dist.language, in the CPU world (and on GPUs with TRITON_DIST_TEST_BACKEND=cuda)."""

import pytest
import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.testing import RankError

from triton_dist.kernels import all_reduce as ar

from _util import poison, rand, sync, this_world
from conftest import BACKEND, new_world


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _who_kernel(out_ptr):
    tl.store(out_ptr, dl.rank())
    tl.store(out_ptr + 1, dl.num_ranks())


@triton.jit
def _push_kernel(buf_ptr, n, BLOCK: tl.constexpr):
    """Program (peer, block): copy my slot's block into slot `rank` of `peer`'s buffer."""
    peer = tl.program_id(0)
    me = dl.rank()
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    vals = tl.load(buf_ptr + me * n + offs, mask=mask)
    tl.store(dl.symm_at(buf_ptr, peer) + me * n + offs, vals, mask=mask)


@triton.jit
def _pull_kernel(buf_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Program (peer, block): read `peer`'s own slot from its heap."""
    peer = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    vals = tl.load(dl.symm_at(buf_ptr, peer) + peer * n + offs, mask=mask)
    tl.store(out_ptr + peer * n + offs, vals, mask=mask)


@triton.jit
def _ring_kernel(buf_ptr, sig_ptr, n, epoch, BLOCK: tl.constexpr):
    """Push my slot to the right neighbour, signal it, wait for the left one, double what it sent."""
    me = dl.rank()
    world = dl.num_ranks()
    right = (me + 1) % world
    left = (me + world - 1) % world
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        mask = start + offs < n
        vals = tl.load(buf_ptr + me * n + start + offs, mask=mask)
        tl.store(dl.symm_at(buf_ptr, right) + me * n + start + offs, vals, mask=mask)
    dl.notify(sig_ptr + me, right, epoch, "set", "intra_node")
    token = dl.wait(sig_ptr + left, 1, "sys", "acquire", epoch)
    base = dl.consume_token(buf_ptr, token)
    for start in range(0, n, BLOCK):
        mask = start + offs < n
        got = tl.load(base + left * n + start + offs, mask=mask)
        tl.store(base + left * n + start + offs, got * 2, mask=mask)


@triton.jit
def _count_kernel(sig_ptr, out_ptr, ADDS: tl.constexpr):
    """Every rank adds ADDS to rank 0's counter with notify(add); rank 0 waits for world * ADDS."""
    for _ in range(ADDS):
        dl.notify(sig_ptr, 0, 1, "add", "intra_node")
    if dl.rank() == 0:
        token = dl.wait(sig_ptr, 1, "sys", "acquire", dl.num_ranks() * ADDS)
        tl.store(dl.consume_token(out_ptr, token), dl.ld(sig_ptr, "sys", "acquire"))


@triton.jit
def _many_signals_kernel(sig_ptr, out_ptr, value):
    """Every rank sets its own slot of rank 0's int64 signal array; rank 0 waits for all slots at once."""
    dl.notify(sig_ptr + dl.rank(), 0, value, "set", "intra_node")
    if dl.rank() == 0:
        token = dl.wait(sig_ptr, dl.num_ranks(), "sys", "acquire", value)
        tl.store(dl.consume_token(out_ptr, token), 1)


@triton.jit
def _ldst_atomic_kernel(word_ptr, out_ptr):
    """st/ld on the right neighbour's word, then atomics on rank 0's counters."""
    me = dl.rank()
    right = (me + 1) % dl.num_ranks()
    dl.st(dl.symm_at(word_ptr, right), me + 100, "sys", "release")
    dl.st(dl.symm_at(word_ptr + 1, right), me + 200, "sys", "relaxed")
    dl.st(dl.symm_at(word_ptr + 2, right), me + 300, "sys", "volatile")
    dl.fence("sys", "acq_rel")
    dl.membar("sys")
    old = dl.atomic_add(dl.symm_at(word_ptr + 3, 0), 1, "sys", "acq_rel")
    tl.store(out_ptr, old)
    dl.atomic_xchg(dl.symm_at(word_ptr + 4, me), me + 7, "gpu", "relaxed")
    prev = dl.atomic_cas(dl.symm_at(word_ptr + 5, 0), 0, me + 1, "sys", "acq_rel")
    tl.store(out_ptr + 1, prev)
    tl.store(out_ptr + 2, dl.ld(word_ptr + 4, "gpu", "relaxed") + dl.ld(word_ptr + 4, "gpu", "volatile"))


@triton.jit
def _clock_kernel(out_ptr):
    t0 = dl.globaltimer()
    tid = dl.tid(0)
    sm = dl.smid()
    t1 = dl.globaltimer()
    tl.store(out_ptr, t0)
    tl.store(out_ptr + 1, t1)
    tl.store(out_ptr + 2, tid.to(tl.int64))
    tl.store(out_ptr + 3, sm.to(tl.int64))


@triton.jit
def _wait_timeout_kernel(out_ptr):
    tl.store(out_ptr, dl.wait_timeout_ns())


@triton.jit
def _never_signalled_kernel(sig_ptr):
    token = dl.wait(sig_ptr + 1, 1, "sys", "acquire", 1)
    tl.store(dl.consume_token(sig_ptr, token), 5)


# ---------------------------------------------------------------------------------------- rank bodies
def _who():
    w = this_world()
    out = torch.full((2,), -1, dtype=torch.int32, device=w.device)
    _who_kernel[(1,)](out)
    return out.tolist()


def test_rank_and_num_ranks_need_no_kernel_argument(world):
    n = world.world_size
    assert world.run(_who) == [[r, n] for r in range(n)]


def _push_pull(n, dtype, seed):
    w = this_world()
    ws = w.world_size
    buf = triton_dist.empty((ws, n), dtype)
    poison(buf)
    buf[w.rank] = rand((n,), dtype, seed + w.rank, w.device)
    triton_dist.barrier()
    block = 512
    _push_kernel[(ws, triton.cdiv(n, block))](buf, n, BLOCK=block)
    sync()
    triton_dist.barrier()
    expect = torch.stack([rand((n,), dtype, seed + r, w.device) for r in range(ws)])
    assert torch.equal(buf, expect), "push: slots differ"
    out = poison(torch.empty((ws, n), dtype=dtype, device=w.device))
    _pull_kernel[(ws, triton.cdiv(n, block))](buf, out, n, BLOCK=block)
    sync()
    assert torch.equal(out, expect), "pull: slots differ"
    triton_dist.barrier()
    triton_dist.free(buf)
    return True


@pytest.mark.parametrize("n,dtype", [(1151, torch.float32), (615, torch.float16), (1000, torch.int8)])
def test_peer_writes_and_reads_exact(world, n, dtype, seed):
    assert all(world.run(_push_pull, n, dtype, seed))


def test_peer_writes_odd_world(world3, seed):
    assert all(world3.run(_push_pull, 1151, torch.float32, seed))


def _ring(n, seed, calls):
    w = this_world()
    ws = w.world_size
    buf = triton_dist.empty((ws, n), torch.float32)
    sig = triton_dist.zeros((ws,), torch.int32)
    triton_dist.barrier()
    left = (w.rank - 1) % ws
    for epoch in range(1, calls + 1):  # signal value = call index: buffers are reused without a reset
        buf.copy_(poison(torch.empty_like(buf)))
        buf[w.rank] = rand((n,), torch.float32, seed + 31 * epoch + w.rank, w.device)
        triton_dist.barrier()
        _ring_kernel[(1,)](buf, sig, n, epoch, BLOCK=256)
        sync()
        expect = rand((n,), torch.float32, seed + 31 * epoch + left, w.device) * 2
        assert torch.equal(buf[left], expect), f"call {epoch}: data from rank {left} wrong"
        triton_dist.barrier()
    triton_dist.free(sig)
    triton_dist.free(buf)
    return True


def test_notify_wait_orders_data_before_signal(world, seed):
    assert all(world.run(_ring, 777, seed, 3))


def test_notify_wait_odd_world(world3, seed):
    assert all(world3.run(_ring, 300, seed, 2))


def _count(adds):
    w = this_world()
    sig = triton_dist.zeros((1,), torch.int32)
    out = torch.full((1,), -1, dtype=torch.int32, device=w.device)
    triton_dist.barrier()
    _count_kernel[(1,)](sig, out, ADDS=adds)
    sync()
    triton_dist.barrier()
    got = out.item()
    triton_dist.free(sig)
    return got


def test_notify_add_accumulates(world):
    got = world.run(_count, 3)
    assert got[0] == 3 * world.world_size
    assert all(g == -1 for g in got[1:])


def _many_signals(value):
    w = this_world()
    sig = triton_dist.zeros((w.world_size,), torch.int64)
    out = torch.zeros((1,), dtype=torch.int32, device=w.device)
    triton_dist.barrier()
    _many_signals_kernel[(1,)](sig, out, value)
    sync()
    triton_dist.barrier()
    got = (out.item(), sig.tolist())
    triton_dist.free(sig)
    return got


def test_wait_on_consecutive_int64_signals(world):
    value = (1 << 40) + 3
    got = world.run(_many_signals, value)
    assert got[0] == (1, [value] * world.world_size)


def _ldst_atomics():
    w = this_world()
    words = triton_dist.zeros((8,), torch.int32)
    out = torch.full((3,), -1, dtype=torch.int32, device=w.device)
    triton_dist.barrier()
    _ldst_atomic_kernel[(1,)](words, out)
    sync()
    triton_dist.barrier()
    res = (words.tolist(), out.tolist())
    triton_dist.free(words)
    return res


def test_ld_st_atomics_fences(world):
    n = world.world_size
    res = world.run(_ldst_atomics)
    olds = sorted(r[1][0] for r in res)
    assert olds == list(range(n)), "atomic_add must hand out each old value once"
    assert res[0][0][3] == n
    winners = [r[1][1] for r in res]
    assert winners.count(0) == 1, "exactly one compare-and-swap wins"
    assert res[0][0][5] == winners.index(0) + 1
    for r, (words, out) in enumerate(res):
        left = (r - 1) % n
        assert words[:3] == [left + 100, left + 200, left + 300]
        assert words[4] == r + 7 and out[2] == 2 * (r + 7)


def _clock():
    w = this_world()
    out = torch.full((4,), -1, dtype=torch.int64, device=w.device)
    _clock_kernel[(1,)](out)
    return out.tolist()


def test_timer_tid_smid(world2):
    for t0, t1, tid, sm in world2.run(_clock):
        assert 0 < t0 <= t1
        assert tid >= 0 and sm >= 0


def _wait_timeout():
    w = this_world()
    out = torch.full((1,), -1, dtype=torch.int64, device=w.device)
    _wait_timeout_kernel[(1,)](out)
    return int(out.item()), int(w.config.wait_timeout_s * 1e9)


def test_wait_timeout_ns_is_the_watchdog_timeout():
    from conftest import new_world
    with new_world(2, env={"TRITON_DIST_WAIT_TIMEOUT_S": "3.5"}) as w:
        for got, want in w.run(_wait_timeout):
            assert got == want == 3_500_000_000


def _never_signalled():
    sig = triton_dist.zeros((2,), torch.int32)
    _never_signalled_kernel[(1,)](sig)
    sync()


def _catch_never_signalled(grid):
    """The timeout is a triton_dist.SignalTimeout the caller can catch (GPU: at the sync, from the watchdog record)."""
    sig = triton_dist.zeros((2,), torch.int32)
    try:
        _never_signalled_kernel[(grid,)](sig)
        sync()
    except triton_dist.SignalTimeout as err:
        return str(err)
    return None


def _catch_op_timeout():
    """An op whose peer never comes: the op's timeout is catchable as triton_dist.SignalTimeout (CPU world)."""
    w = this_world()
    ctx = ar.AllReduceContext(64, torch.float32, num_programs=1)
    caught = None
    if w.rank == 1:
        try:
            ar.all_reduce(torch.ones(64), ctx=ctx, method="one_shot")
        except triton_dist.SignalTimeout as err:
            caught = str(err)
    return caught


def test_wait_that_never_gets_its_signal_fails_cleanly():
    # mps=False: on a shared GPU under MPS the watchdog's trap would reach every MPS client on the GPU (the other
    # worlds of this session too); time-sliced ranks keep it to this world.
    with new_world(2, env={"TRITON_DIST_WAIT_TIMEOUT_S": "1"}, mps=False) as w:
        with pytest.raises(RankError, match=r"waited 1 s on the signal at rank \d's heap offset \d+ for value 1, "
                                            r"last saw 0"):
            w.run(_never_signalled, timeout=60)
        for msg in w.run(_catch_never_signalled, 1, timeout=60):
            assert msg is not None and "waited 1 s" in msg and "last saw 0" in msg
        if BACKEND == "cpu":  # a GPU context does not survive its trap: one timeout per world there
            first = w.run(_catch_never_signalled, 3, timeout=60)[0]
            assert "(program 0 of 3) -- in the CPU world the programs of a launch run one at a time in pid order" \
                in first
            op_timeout = w.run(_catch_op_timeout, timeout=60)[1]
            assert op_timeout.startswith("rank 1 waited 1 s") and op_timeout.endswith("(in kernel _one_shot_kernel)")


@triton.jit
def _bad_semantic_kernel(ptr):
    dl.ld(ptr, "gpu", "sequential")


@triton.jit
def _bad_scope_kernel(ptr):
    dl.notify(ptr, 0, 1, "set", "galaxy")


@triton.jit
def _inter_node_notify_kernel(ptr):
    dl.notify(ptr, 0, 1, "set", "inter_node")


def _bad_device_args():
    sig = triton_dist.zeros((1,), torch.int32)
    errors = []
    for kernel in (_bad_semantic_kernel, _bad_scope_kernel, _inter_node_notify_kernel):
        try:
            kernel[(1,)](sig)
        except Exception as e:  # compile errors on GPU, interpreter errors on CPU
            errors.append(repr(e))
    outside = torch.zeros((4,), dtype=torch.int32, device=this_world().device)
    triton_dist.free(sig)
    return errors, outside.sum().item()


def test_bad_scope_and_semantic_are_rejected(world2):
    errors, _ = world2.run(_bad_device_args)[0]
    assert len(errors) == 3
    assert "sequential" in errors[0] and "galaxy" in errors[1] and "libshmem_device.signal_op" in errors[2]
