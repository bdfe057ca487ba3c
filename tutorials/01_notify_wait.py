"""Tutorial 1: hand a block of data to your neighbour with ``symm_at``, ``notify`` and ``wait``.

Run it with ``triton-dist run -n 2 tutorials/01_notify_wait.py`` (any ``-n`` >= 2; GPUs when present,
otherwise a CPU world of processes running the kernel under Triton's interpreter).

The ranks form a ring. Each rank owns a symmetric buffer ``inbox`` (same offset on every rank, allocated with
``triton_dist.empty``) and a symmetric int32 ``signal``. One kernel, one program per rank:

1. **Push.** Rank ``r`` loads its own ``x`` and stores it straight into ``inbox`` *on rank r+1*: ``dl.symm_at``
   turns the local address of ``inbox`` into the address of the same object on the peer, and ordinary
   ``tl.store`` writes through it (NVLink on GPUs, shared memory in the CPU world).
2. **Notify.** Rank ``r`` then sets ``signal`` on rank r+1 to this round's number with ``dl.notify``. The notify
   is a *release*: every store the program made before it becomes visible no later than the signal.
3. **Wait.** Meanwhile rank r+1 spins in ``dl.wait`` on its own ``signal`` until it reads that number. The
   wait is an *acquire*: nothing the program does after it may be performed before it.
4. **Consume.** ``dl.consume_token`` ties the ``inbox`` base pointer to the wait's result, so the compiler
   cannot hoist the loads of step 5 above the spin loop (a plain pointer has no data dependence on the
   wait, and loads without side effects are fair game for reordering).
5. **Read.** Rank r+1 loads ``inbox`` through that pointer and writes it to a private ``out`` tensor.

::

    rank r (producer)                          rank r+1 (consumer)
    -----------------                          -------------------
    tl.store(symm_at(inbox, r+1), x) --data--> inbox     (lands in some order, maybe late)
    dl.notify(signal, r+1, round)  ---flag---> signal    (release: ordered after the data)
                                               tok = dl.wait(signal, ..., round)   (acquire)
                                               p = dl.consume_token(inbox, tok)
                                               out = tl.load(p + offs)   (sees all of x)

Why release/acquire matters: a GPU does not keep the order of two stores from one thread as seen from
another GPU, and stores from different threads of one program are not ordered at all. Without the release,
the flag could arrive on rank r+1 before the data it announces, and the consumer would read stale ``inbox``
contents. Without the acquire (and the token), the consumer's loads could be issued, or served from a cache,
before the flag was seen. Release on one side plus acquire on the other gives the guarantee we need: once
the flag is observed, everything written before it is observed too. The ordering only holds in pairs: a
release nobody acquires, or an acquire of a flag written without release, guarantees nothing.

Rounds: the kernel runs a few times on the same buffers. The signal value is the round number, so the
flags never have to be reset: round ``k`` waits for ``k``, and a stale ``k - 1`` left from the previous round
does not satisfy it. A host barrier between rounds makes sure no producer overwrites ``inbox`` while its
consumer is still reading the previous round (tutorial 2 replaces that barrier with device-side signals).

In the CPU world the same source runs under the interpreter: scopes and fences have no effect there, so it
checks the protocol's logic (who waits for what) but not its memory ordering; that is tested on the GPU.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl


@triton.jit
def ring_push_kernel(x_ptr, inbox_ptr, signal_ptr, out_ptr, n, round_no, BLOCK: tl.constexpr):
    """Push ``x`` to the right neighbour's ``inbox``, then read what the left neighbour pushed into ours.

    ``inbox_ptr`` and ``signal_ptr`` are symmetric (on the heap); ``x_ptr`` and ``out_ptr`` are private.
    One program per rank; ``n`` <= ``BLOCK`` elements.
    """
    me = dl.rank()
    right = (me + 1) % dl.num_ranks()
    offs = tl.arange(0, BLOCK)
    mask = offs < n

    # 1. push: the same object on the right neighbour, written with ordinary stores
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(dl.symm_at(inbox_ptr, right) + offs, x, mask=mask)
    # 2. notify: release, so the stores above are visible before the flag
    dl.notify(signal_ptr, right, signal=round_no, sig_op="set", comm_scope="intra_node")

    # 3. wait for the left neighbour's flag on our own signal (acquire, system scope: the writer is another GPU)
    token = dl.wait(signal_ptr, 1, scope="sys", semantic="acquire", wait_value=round_no)
    # 4. loads through `inbox` now depend on the wait
    inbox = dl.consume_token(inbox_ptr, token)
    # 5. read
    tl.store(out_ptr + offs, tl.load(inbox + offs, mask=mask), mask=mask)


def data_of(rank: int, n: int, round_no: int, device) -> torch.Tensor:
    """What ``rank`` sends in round ``round_no``: random, reproducible on every rank, never all zeros."""
    g = torch.Generator().manual_seed(1000 * round_no + rank)
    return torch.randn(n, generator=g).to(device)


def main() -> None:
    world = triton_dist.init()
    if world.world_size < 2:
        raise SystemExit("run with at least 2 ranks: triton-dist run -n 2 tutorials/01_notify_wait.py")
    n, rounds = 1000, 3  # n is deliberately not a power of two: the kernel masks the tail of its block
    block = triton.next_power_of_2(n)
    left = (world.rank - 1) % world.world_size

    inbox = triton_dist.empty((n,), torch.float32)
    signal = triton_dist.zeros((1,), torch.int32)
    triton_dist.barrier()  # every rank's signal is zero before anyone can notify

    bad = 0
    for round_no in range(1, rounds + 1):
        x = data_of(world.rank, n, round_no, world.device)
        out = torch.full((n,), float("nan"), device=world.device)
        ring_push_kernel[(1,)](x, inbox, signal, out, n, round_no, BLOCK=block)
        if not torch.equal(out.cpu(), data_of(left, n, round_no, "cpu")):
            bad += 1
        triton_dist.barrier()  # everyone has read its inbox before the next round overwrites it

    failures = torch.tensor([bad], dtype=torch.int64)
    dist.all_reduce(failures, group=world.group)  # a CPU tensor: gloo on every backend
    if world.rank == 0:
        print(f"notify/wait ring: {world.world_size} ranks, backend {world.backend}, "
              f"{rounds} rounds of {n} float32 each")
        print("verdict: every rank received its left neighbour's data exactly" if failures.item() == 0 else
              f"verdict: MISMATCH in {failures.item()} (rank, round) pairs")
    triton_dist.finalize()
    if failures.item():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
