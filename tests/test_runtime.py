"""Host runtime: symmetric heap allocation, peer views, barriers, bad input, the process world itself."""
import time

import pytest
import torch

import triton_dist
from triton_dist.testing import RankError, WorldTimeout

from _util import rand, this_world
from conftest import new_world


def _alloc_offsets():
    w = this_world()
    heap = w.heap
    a = triton_dist.empty((1151,), torch.float32)
    b = triton_dist.zeros((5, 123), torch.float16)
    assert torch.count_nonzero(b) == 0
    offs = [heap.offset_of(a), heap.offset_of(b)]
    triton_dist.free(a)
    c = triton_dist.empty((1000,), torch.int32)  # fits in a's freed range: reused
    offs.append(heap.offset_of(c))
    triton_dist.free(b)
    triton_dist.free(c)
    assert heap.bytes_in_use == 0
    return offs


def test_allocation_is_symmetric_and_reuses_freed_ranges(world):
    offsets = world.run(_alloc_offsets)
    assert all(o == offsets[0] for o in offsets), offsets
    a, b, c = offsets[0]
    assert a % 256 == 0 and b % 256 == 0 and b > a
    assert c == a


def _peer_views(seed):
    w = this_world()
    x = triton_dist.empty((7, 13), torch.float32)
    x.copy_(rand((7, 13), torch.float32, seed + w.rank, w.device))
    triton_dist.barrier()
    for peer in range(w.world_size):
        expect = rand((7, 13), torch.float32, seed + peer, w.device)
        assert torch.equal(triton_dist.peer_view(x, peer), expect)
        view = x[2:5, 1::3]
        assert torch.equal(triton_dist.peer_view(view, peer), expect[2:5, 1::3])
    triton_dist.barrier()
    # a write through a peer view lands in the peer's heap
    right = (w.rank + 1) % w.world_size
    triton_dist.peer_view(x, right)[0, 0] = 1000.0 + w.rank
    triton_dist.barrier()
    got = x[0, 0].item()
    triton_dist.free(x)
    return got


def test_peer_view_reads_and_writes_peer_heaps(world, seed):
    got = world.run(_peer_views, seed)
    n = len(got)
    assert got == [1000.0 + (r - 1) % n for r in range(n)]


def test_peer_view_odd_world(world3, seed):
    got = world3.run(_peer_views, seed)
    assert got == [1002.0, 1000.0, 1001.0]


def _exhaust():
    heap = this_world().heap
    with pytest.raises(triton_dist.HeapExhausted, match=r"TRITON_DIST_HEAP_SIZE"):
        triton_dist.empty((heap.nbytes,), torch.uint8)
    return True


def _bad_inputs():
    w = this_world()
    outside = torch.zeros(4, device=w.device)
    with pytest.raises(triton_dist.NotSymmetric, match="not on rank .* symmetric heap"):
        triton_dist.peer_view(outside, 0)
    with pytest.raises(triton_dist.NotSymmetric, match="not returned by triton_dist.empty"):
        triton_dist.free(outside)
    with pytest.raises(TypeError, match="complex64 is not supported"):
        triton_dist.empty((4,), torch.complex64)
    x = triton_dist.empty((4,), torch.float32)
    with pytest.raises(ValueError, match=r"peer must be in \[0, "):
        triton_dist.peer_view(x, w.world_size)
    triton_dist.free(x)
    return True


def test_bad_input_gets_clear_errors(world2):
    assert world2.run(_exhaust) == [True, True]
    assert world2.run(_bad_inputs) == [True, True]


def test_heap_smaller_than_the_reserved_region_is_refused():
    with pytest.raises(RankError, match=r"reserved for the runtime's signals, so it must be at least 128.0 KiB"):
        with new_world(2, env={"TRITON_DIST_HEAP_SIZE": "64K"}):
            pass


def _mismatched_allocation():
    w = this_world()
    triton_dist.empty((100 + 100 * w.rank,), torch.float32)


def test_debug_mode_detects_different_allocation_sequences():
    with new_world(2, env={"TRITON_DIST_DEBUG": "1"}) as w:
        with pytest.raises(RankError, match="differs across ranks"):
            w.run(_mismatched_allocation, timeout=60)


def _barriers():
    w = this_world()
    for _ in range(3):
        triton_dist.barrier()
        triton_dist.stream_barrier()
    return w.rank


def test_barriers(world):
    assert world.run(_barriers) == list(range(world.world_size))


def _raise_on_rank_one():
    if this_world().rank == 1:
        raise ValueError("planted failure on rank 1")
    return True


def _hang_on_rank_one():
    if this_world().rank == 1:
        time.sleep(600)
    return True


def test_rank_that_raises_fails_with_its_traceback_and_world_recovers(world2):
    with pytest.raises(RankError, match=r"rank 1 raised(.|\n)*planted failure on rank 1"):
        world2.run(_raise_on_rank_one)
    assert world2.run(_barriers) == [0, 1]


def test_rank_that_hangs_is_named_and_world_recovers(world2):
    t0 = time.monotonic()
    with pytest.raises(WorldTimeout, match=r"ranks \[1\] of 2 did not finish within 3 s"):
        world2.run(_hang_on_rank_one, timeout=3)
    assert time.monotonic() - t0 < 20
    assert world2.run(_barriers) == [0, 1]


def _mismatched_ops():
    """With TRITON_DIST_DEBUG=1 every op compares its call across ranks first: each mismatch raises CallMismatch on
    every rank, naming both calls; a matching call still works."""
    from triton_dist import ops
    w = this_world()
    got = []
    rows, dev = 8 if w.rank == 0 else 16, w.device
    for call in (lambda: ops.reduce_scatter(torch.ones(rows, 3, device=dev)),
                 lambda: ops.all_reduce(torch.ones(4, device=dev), method="one_shot" if w.rank == 0 else "two_shot"),
                 lambda: ops.all_to_all_v(torch.ones(3 + w.rank, 2, device=dev), [1 + w.rank, 2], [1, 2 + w.rank])):
        try:
            call()
            got.append(None)
        except triton_dist.CallMismatch as err:
            got.append(str(err))
    same = ops.all_reduce(torch.full((4,), 1.0 + w.rank, device=dev))
    got.append(same.tolist())
    return got


def test_debug_mode_names_calls_that_differ_across_ranks():
    with new_world(2, env={"TRITON_DIST_DEBUG": "1"}) as w:
        for rank, (rs, ar, a2av, same) in enumerate(w.run(_mismatched_ops, timeout=90)):
            assert "rank 0 called reduce_scatter(method=auto, x=(8, 3) float32)" in rs, rs
            assert "rank 1 called reduce_scatter(method=auto, x=(16, 3) float32)" in rs, rs
            assert "method=one_shot" in ar and "method=two_shot" in ar, ar
            assert "rank 1 sends 2 rows to rank 1, which expects 3" in a2av, a2av
            assert same == [3.0] * 4


def _mismatch_reports():
    """Rank 0 reports a mismatch; rank 1's timeouts during that window become CallMismatch quoting it, a timeout
    whose wait began after the report stays a SignalTimeout."""
    import time
    w = this_world()
    if w.rank == 0:
        w.report_mismatch("rank 0 saw signature 0x1 against 0x2")
    w.barrier()
    got = []
    if w.rank == 1:
        got.append(w.timeout_error("rank 1 waited 5 s on READY", waited_s=5.0))
        time.sleep(1.5)
        got.append(w.timeout_error("rank 1 waited 0.2 s on READY", waited_s=0.2))
    w.barrier()
    return [(type(e).__name__, str(e)) for e in got]


def test_a_reported_mismatch_turns_a_peers_timeout_into_call_mismatch(world2):
    _, (during, after) = world2.run(_mismatch_reports)
    assert during[0] == "CallMismatch", during
    assert "rank 1: the call was stopped because rank 0 found the ranks' calls differ: rank 0 saw signature 0x1" \
        in during[1] and "(this rank's own wait: rank 1 waited 5 s on READY)" in during[1], during
    assert after == ("SignalTimeout", "rank 1 waited 0.2 s on READY"), after
