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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import epoch_counters

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
def ll_send_all(src_ptr, n, words, buf_ptr, slot_words, e, rank, world, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Send this program's tiles of a message of ``words`` 32-bit words (``n`` elements at ``src_ptr``, see
    :func:`ll_pack`) to every rank (:func:`ll_send`)."""
    for t in range(tl.program_id(0), tl.cdiv(words, BLOCK), tl.num_programs(0)):
        w, mask = ll_lanes(t, words, BLOCK)
        ll_send(buf_ptr, slot_words, ll_pack(src_ptr, w, n, HALF), w, e, rank, world)


@triton.jit
def _all_flagged(v, e):
    return tl.min(((v >> 32).to(tl.int32) == e).to(tl.int32), axis=0) != 0


@triton.jit
def ll_recv(buf_ptr, slot_words, w, e, src, world):
    """The int32 words ``w`` that rank ``src`` sent in call ``e`` (spins until they arrived).

    Fast path: the whole tile is polled with one vector load per pass (a word-by-word spin would pay one memory
    latency per word in sequence); after ``FAST_POLL_NS`` without success, ``dl.wait_flagged`` takes over, whose
    timeout reports the rank, the word and the flag seen to the watchdog."""
    ptrs = buf_ptr + ((e % 2) * world + src).to(tl.int64) * slot_words + w
    v = tl.load(ptrs, volatile=True)
    t0 = dl.globaltimer()
    while (not _all_flagged(v, e)) and (dl.globaltimer() - t0 < FAST_POLL_NS):
        v = tl.load(ptrs, volatile=True)
    words = v.to(tl.int32)
    if not _all_flagged(v, e):
        words = dl.wait_flagged(ptrs, e)
    return words


class LLBuffer:
    """The symmetric LL buffer of a context: ``2 x world`` slots of ``slot_words`` int64 words, zeroed.

    Collective (allocates on the symmetric heap and synchronises, so that no peer writes before every buffer is
    zeroed)."""

    def __init__(self, max_bytes: int, block_words: int, max_programs: int):
        self.world = triton_dist.current_world()
        words = -(-max(max_bytes, 4) // 4)
        self.slot_words = -(-words // block_words) * block_words  # whole tiles: clamped lanes stay in the slot
        self.max_bytes = 4 * self.slot_words
        self.block_words = block_words
        self.buf = triton_dist.zeros((2 * self.world.world_size * self.slot_words,), torch.int64)
        self.counters = epoch_counters(max_programs, self.world.device)  # LL calls' own epochs (take_epoch)
        self.world.barrier()

    def close(self) -> None:
        triton_dist.free(self.buf)
