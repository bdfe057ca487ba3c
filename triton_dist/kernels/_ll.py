"""The low-latency ("LL") protocol of the small-message collectives: flags packed with the data.

Every 32-bit word of a message travels as one 64-bit word ``(epoch << 32) | data``, stored straight into the
receiver's LL buffer with an 8-byte volatile store (single-copy atomic). The receiver polls its own buffer until the
high half of each word equals this call's epoch (``dl.wait_flagged``): the data arrived with its flag, so there is no
fence, no separate signal and no round trip before the data moves. It costs twice the bytes, so it is for messages
of at most :data:`LL_MAX_BYTES`.

Buffer: ``2 x world`` slots of ``slot_words`` int64 words on every rank (:class:`LLBuffer`), with its own epoch
counters (``_common.take_epoch``: bumped by the kernel, independent of the context's staged calls); rank ``r``
writes into slot ``[e % 2][r]`` of each receiver. Reuse is safe without a ``done`` handshake: a rank can reach LL call ``e + 2`` (the
next one that writes the same parity) only after receiving every peer's data of LL call ``e + 1``, which each peer
sends only after it finished LL call ``e``, i.e. after it read the slots of call ``e``. Flags are epochs (>= 1) and
the buffer starts zeroed, so stale words never match.

Tiles: a program's tile is ``BLOCK`` words; lanes past the end of the message point at the tile's first word (always
in range), so they store and poll a valid word and no lane waits on a word nobody sends.

Call signature: program 0 of every sender also stores a header ``(epoch << 32) | sig`` (``_common.send_header``) into
header slot ``[e % 2][rank]`` after the data slots of every receiver; the receiver polls each sender's header in the
same loop as its words (no extra round trip) and stops the call with ``CallMismatch`` if the sender made another
call (op, dtype or size): a peer sending fewer words is caught instead of waited for. The headers' reuse follows the
data slots' argument above.

A peer in another *protocol*: the contexts with LL also have staged methods (their signal pad). If a peer's words
have not come after the fast poll, the receiver also watches, for up to half the wait timeout, program 0's READY
signal of that peer in the context's pad: a value above this rank's own count of staged calls means the peer is in a
staged call this rank is not making (e.g. ``method="auto"`` chose by a size that differs across ranks), and the call
stops with ``CallMismatch`` naming both signatures (the peer's from its SIG slot). Only the slow path pays for it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import READY, SIG, SIGNATURE_CHECK, epoch_counters, label_words, send_header

PROTOCOL_CHECK = tl.constexpr(4)  # dl.check_agree code: the peer is in a staged call (runtime.errors.AGREE_CHECKS)

LL_MAX_BYTES = 256 << 10  # per rank and call; larger messages use the staged methods
FAST_POLL_NS = tl.constexpr(100_000_000)  # vector polling of a tile before the watchdog-checked word-by-word wait


@triton.jit
def ll_lanes(t, words, BLOCK: tl.constexpr):
    """Word indices of tile ``t`` (lanes past ``words`` clamped to the tile's first word) and their mask."""
    w = t * BLOCK + tl.arange(0, BLOCK)
    mask = w < words
    return tl.where(mask, w, t * BLOCK), mask


@triton.jit
def ll_pack(src_ptr, w, n, HALF: tl.constexpr):
    """32-bit words ``w`` of a message of ``n`` elements at ``src_ptr`` (int32 elements, or int16 pairs with
    ``HALF``; an odd last element is padded with zero bits)."""
    if HALF:
        lo = tl.load(src_ptr + 2 * w).to(tl.int32) & 0xFFFF
        hi = tl.load(src_ptr + 2 * w + 1, mask=2 * w + 1 < n, other=0).to(tl.int32) & 0xFFFF
        return lo | (hi << 16)
    else:
        return tl.load(src_ptr + w)


@triton.jit
def ll_send(buf_ptr, slot_words, word, w, e, rank, world):
    """Store ``word`` (int32, at word indices ``w``) with flag ``e`` into slot ``[e % 2][rank]`` of every rank's
    LL buffer, starting with the right neighbour."""
    packed = (e.to(tl.int64) << 32) | (word.to(tl.int64) & 0xFFFFFFFF)
    dst = buf_ptr + ((e % 2) * world + rank).to(tl.int64) * slot_words + w
    for i in range(1, world + 1):
        dl.st(dl.symm_at(dst, (rank + i) % world), packed, "sys", "volatile")


@triton.jit
def ll_headers(buf_ptr, slot_words, world):
    """The header slots (``2 x world`` int64 words after the data slots) of an LL buffer."""
    return buf_ptr + 2 * world * slot_words


@triton.jit
def ll_send_all(src_ptr, n, words, buf_ptr, slot_words, e, rank, world, sig, HALF: tl.constexpr,
                BLOCK: tl.constexpr):
    """Send this program's tiles of a message of ``words`` 32-bit words (``n`` elements at ``src_ptr``, see
    :func:`ll_pack`) to every rank (:func:`ll_send`); program 0 first sends the call's header (signature ``sig``)."""
    if tl.program_id(0) == 0:
        for i in range(1, world + 1):
            send_header(ll_headers(buf_ptr, slot_words, world), sig, e, rank, (rank + i) % world)
    for t in range(tl.program_id(0), tl.cdiv(words, BLOCK), tl.num_programs(0)):
        w, mask = ll_lanes(t, words, BLOCK)
        ll_send(buf_ptr, slot_words, ll_pack(src_ptr, w, n, HALF), w, e, rank, world)


@triton.jit
def _all_flagged(v, e):
    return tl.min(((v >> 32).to(tl.int32) == e).to(tl.int32), axis=0) != 0


@triton.jit
def _flagged(h, e):
    return (h >> 32).to(tl.int32) == e


@triton.jit
def _staged_call_of(pad_ptr, pad_counters_ptr, src, world):
    """The signature of the staged call that ``src`` is making on this context and this rank is not (its READY of
    program 0 is past this rank's count of staged calls), else 0."""
    ready = dl.ld(pad_ptr + READY * world + src, "sys", "acquire")  # slot [0][READY][src]
    made = tl.load(pad_counters_ptr + 1, volatile=True)  # this rank's staged calls (program slot 0)
    theirs = tl.load(pad_ptr + SIG * world + src, volatile=True)  # written before that READY (its fence)
    return tl.where(ready > made, theirs, 0)


@triton.jit
def ll_recv(buf_ptr, slot_words, w, e, src, world, sig, pad_ptr, pad_counters_ptr):
    """The int32 words ``w`` that rank ``src`` sent in call ``e`` (spins until they arrived), after checking that
    ``src``'s header carries this call's signature ``sig`` (else ``CallMismatch``).

    Fast path: the whole tile and the header are polled with one vector load and one scalar load per pass (a
    word-by-word spin would pay one memory latency per word in sequence). After ``FAST_POLL_NS`` without success,
    the polling goes on for up to half the wait timeout while watching whether ``src`` is in a staged call of this
    context instead (``pad_ptr``, ``pad_counters_ptr``: the context's signal pad and its counters; see the module
    docstring); then ``dl.wait_flagged`` takes over (the header first), whose timeout reports the rank, the word and
    the flag seen to the watchdog."""
    ptrs = buf_ptr + ((e % 2) * world + src).to(tl.int64) * slot_words + w
    hdr = ll_headers(buf_ptr, slot_words, world) + (e % 2) * world + src
    v = tl.load(ptrs, volatile=True)
    h = tl.load(hdr, volatile=True)
    t0 = dl.globaltimer()
    while (not (_all_flagged(v, e) and _flagged(h, e))) and (dl.globaltimer() - t0 < FAST_POLL_NS):
        v = tl.load(ptrs, volatile=True)
        h = tl.load(hdr, volatile=True)
    done = _all_flagged(v, e) and _flagged(h, e)
    if not done:  # slow path: is src making another protocol's call?
        staged = sig * 0
        t1 = dl.globaltimer()
        while (not done) and staged == 0 and (dl.globaltimer() - t1 < dl.wait_timeout_ns() // 2):
            # READY first (acquire): if src is already in a later call, its words of this one are visible after it
            seen = _staged_call_of(pad_ptr, pad_counters_ptr, src, world)
            v = tl.load(ptrs, volatile=True)
            h = tl.load(hdr, volatile=True)
            done = _all_flagged(v, e) and _flagged(h, e)
            staged = tl.where(done, 0, seen)
        dl.check_agree(sig, tl.where(staged != 0, staged, sig), src, PROTOCOL_CHECK)
    theirs = h.to(tl.int32)
    if not _flagged(h, e):
        theirs = dl.wait_flagged(hdr, e)
    dl.check_agree(sig, theirs, src, SIGNATURE_CHECK)
    words = v.to(tl.int32)
    if not _all_flagged(v, e):
        words = dl.wait_flagged(ptrs, e)
    return words


class LLBuffer:
    """The symmetric LL buffer of a context: ``2 x world`` slots of ``slot_words`` int64 words, then ``2 x world``
    header words, zeroed. ``op``: the op's name in error messages.

    Collective (allocates on the symmetric heap and synchronises, so that no peer writes before every buffer is
    zeroed)."""

    def __init__(self, max_bytes: int, block_words: int, max_programs: int, op: str = "ll"):
        self.world = triton_dist.current_world()
        words = -(-max(max_bytes, 4) // 4)
        self.slot_words = -(-words // block_words) * block_words  # whole tiles: clamped lanes stay in the slot
        self.max_bytes = 4 * self.slot_words
        self.block_words = block_words
        ws, slot = self.world.world_size, self.slot_words
        self.buf = triton_dist.zeros((2 * ws * (slot + 1),), torch.int64)

        def names(i):
            if i >= 2 * ws * slot:
                return f"LL call header from rank {(i - 2 * ws * slot) % ws} (method ll)", (i - 2 * ws * slot) % ws
            return f"LL word {i % slot} from rank {(i // slot) % ws} (method ll)", (i // slot) % ws

        label_words(self.buf, op, names)
        self.counters = epoch_counters(max_programs, self.world.device)  # LL calls' own epochs (take_epoch)
        self.world.barrier(f"creating the LL buffer of a context of {op}")

    def close(self) -> None:
        triton_dist.free(self.buf)
