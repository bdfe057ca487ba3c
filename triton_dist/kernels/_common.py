"""Shared pieces of the collective kernels: the per-program rendezvous protocol and the context base.

Protocol ("epochs"). Every context owns a *signal pad* on the symmetric heap: for each of up to ``num_programs``
programs, ``REGIONS`` regions of ``world`` int32 slots (program-major, so the layout does not depend on how many
programs a call launches), and local device epoch counters that the kernel itself bumps (:func:`take_epoch`: no
host-side op per call, CUDA-graph capturable). Program ``p`` of rank ``r`` talks only to program ``p`` of the other
ranks:

* ``announce(pad, region, e)``: set slot ``[p][region][r]`` on every rank to ``e`` (barrier, one system-scope
  fence, then one relaxed store per rank: a single release for all ranks);
* ``await_all(pad, region, e)``: wait until slots ``[p][region][0..world)`` of this rank are all ``>= e``.

Counters only grow, so a fast peer that already announced epoch ``e+1`` still satisfies a wait for ``e``; nothing is
ever reset, which is what makes back-to-back calls (and graph replays) safe without a host barrier. A collective
that stages data in a symmetric buffer uses a ``done`` region: before overwriting its staging block a program waits
until every peer announced ``done >= e-1`` (it finished reading the previous call's data).

A call launches as many programs as it has tiles, up to the context's ``num_programs`` (small messages use few
programs, so few signals). When a call's staging layout or program count differs from the previous call's on
the same context, tile ownership changed, and the kernel waits for the ``done`` of every program of the previous
call instead of only its own (``await_previous``; the host passes the previous program count).

Because no program waits for another program of the same rank, the kernels progress under the CPU world's
interpreter (programs run one at a time, in pid order) as well as on GPUs.

Call signatures. Every call carries ``sig`` (:func:`call_signature`: a hash of op, method, dtype and size, the same on
every rank for the same call). Before announcing ``READY`` a program writes it into slot ``[p][SIG][rank]`` of every
rank (:func:`publish_signature`; the announce's fence orders it), and after its ``READY`` wait compares every peer's
with its own (:func:`check_signatures`): ranks that called differently stop with ``CallMismatch`` (watchdog record
and trap on GPUs) instead of returning garbage. The SIG slots are rewritten only after ``DONE >= e-1`` of every peer,
so a peer still comparing the previous call's never sees the next one's. The kernels take ``sig`` with
``do_not_specialize``: one binary serves every signature.

Signature headers. Protocols without a ready round (the LL methods, the overlapped GEMMs' tile flags) send the
signature as a *header*: one 64-bit word ``(epoch << 32) | sig`` per sender and call parity (:func:`send_header`),
polled like LL data (:func:`check_headers`), so a receiver compares the call before it waits for data that a peer
making another call would never send.

Error messages. Every context labels its signal words on the heap (:func:`label_pad`,
``SymmetricHeap.label``): a wait that times out then names the op, the signal, the rank that had not arrived and
what to check, not only a heap offset.
"""
from __future__ import annotations

import collections
import zlib

import torch
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.runtime.errors import name_signature


READY = tl.constexpr(0)  # pad regions: staging filled,
REDUCED = tl.constexpr(1)  # my chunk reduced (two-shot),
DONE = tl.constexpr(2)  # finished reading the peers' staging
SIG = tl.constexpr(3)  # the call's signature (not an epoch: compared, never waited on)
REGIONS = tl.constexpr(4)
SIGNATURE_CHECK = tl.constexpr(3)  # dl.check_agree code of a signature mismatch (runtime.errors.AGREE_CHECKS)
REDUCTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_TILE_ELEMS = 8192  # the largest tile of a reduction call (CollectiveContext.tile_elems)
MAX_PEERS = tl.constexpr(64)  # lanes of a vector poll over every rank (device_state.MAX_RANKS)
REGION_NAMES = ("READY", "REDUCED", "DONE", "SIG")


@triton.jit
def take_epoch(counters_ptr):
    """This call's epoch, bumped on the device: ``counters_ptr[0]`` holds the context's program capacity ``P``,
    ``counters_ptr[1 + q]`` the number of calls program slot ``q`` has seen. Program ``pid`` reads its slot, adds
    one and writes the result to every slot it stands for in this launch (``pid, pid + nprog, ... < P``), so all
    slots stay equal whatever the launch size. No program reads a slot another program of the launch writes, and
    the next launch starts after this one ended (stream order): no host-side bump kernel per call.

    The barrier between the read and the writes matters on GPUs: every warp of the program loads the slot itself,
    and a warp that loaded after another warp's store would take ``e + 1`` (found on an H200, 2026-12-01: programs
    one epoch ahead of their peers, a stall every few thousand calls of the collectives stress)."""
    pid = tl.program_id(0)
    e = tl.load(counters_ptr + 1 + pid) + 1
    tl.debug_barrier()  # every thread has read slot pid before any thread overwrites it
    for q in range(pid, tl.load(counters_ptr), tl.num_programs(0)):
        tl.store(counters_ptr + 1 + q, e)
    return e


@triton.jit
def signal_slots(pad_ptr, region, world, pid=None):
    """The ``world`` slots of ``region`` for program ``pid`` (default: this program) in this rank's pad."""
    if pid is None:
        pid = tl.program_id(0)
    return pad_ptr + (pid * REGIONS + region) * world


@triton.jit
def announce(pad_ptr, region, epoch, rank, world):
    """Tell program ``pid`` of every rank that this program reached ``epoch`` in ``region``.

    One release for all ranks: barrier (every thread's writes and reads are done), one system-scope fence, then a
    relaxed store per rank. ``world`` release notifies would pay ``world`` fences (NOTES.md)."""
    slot = signal_slots(pad_ptr, region, world) + rank
    tl.debug_barrier()
    dl.fence("sys", "acq_rel")
    for peer in range(world):
        dl.notify(slot, peer, epoch, "set", "intra_node", semantic="relaxed")


@triton.jit
def await_all(pad_ptr, region, epoch, world):
    """Wait until program ``pid`` of every rank announced at least ``epoch`` in ``region``; returns a token."""
    return dl.wait(signal_slots(pad_ptr, region, world), world, "sys", "acquire", epoch, cmp="ge")


@triton.jit
def publish_signature(pad_ptr, sig, rank, world):
    """Write this call's signature into slot ``[pid][SIG][rank]`` of every rank; call it before the ``READY``
    announce (whose fence orders it) and after :func:`await_previous`."""
    slot = signal_slots(pad_ptr, SIG, world) + rank
    for peer in range(world):
        tl.store(dl.symm_at(slot, peer), sig)


@triton.jit
def check_signatures(pad_ptr, sig, world, token):
    """After a ``READY`` wait (``token``): stop the call with ``CallMismatch`` if a peer's program ``pid`` published
    another signature than this rank's ``sig`` (a different op, method, dtype or size)."""
    slots = dl.consume_token(signal_slots(pad_ptr, SIG, world), token)
    for peer in range(world):
        dl.check_agree(sig, tl.load(slots + peer), peer, SIGNATURE_CHECK)


@triton.jit
def send_header(hdr_ptr, sig, e, rank, peer):
    """Store this call's header ``(e << 32) | sig`` into slot ``[e % 2][rank]`` of ``peer``'s headers (``hdr_ptr``:
    ``2 x world`` int64 words, symmetric; one 8-byte store, single-copy atomic). A slot of parity ``e % 2`` is
    rewritten in call ``e + 2``: the protocol must order that after every receiver checked call ``e``."""
    world = dl.num_ranks()
    packed = (e.to(tl.int64) << 32) | (sig.to(tl.int64) & 0xFFFFFFFF)
    dl.st(dl.symm_at(hdr_ptr + (e % 2) * world + rank, peer), packed, "sys", "volatile")


@triton.jit
def send_headers(hdr_ptr, sig, e, rank, world):
    """:func:`send_header` to every rank (this one included)."""
    for i in range(world):
        send_header(hdr_ptr, sig, e, rank, (rank + i) % world)


@triton.jit
def check_headers(hdr_ptr, sig, e, world):
    """Wait for every rank's header of call ``e`` (one vector poll) and stop the call with ``CallMismatch`` if one
    carries another signature than ``sig``."""
    src = tl.arange(0, MAX_PEERS)
    src = tl.where(src < world, src, 0)  # lanes past the world poll rank 0's word
    got = dl.wait_flagged(hdr_ptr + (e % 2) * world + src, e)
    dl.check_agree(sig, got, src, SIGNATURE_CHECK)


@triton.jit
def tile_span(lo, hi, base, nprog, BLOCK: tl.constexpr):
    """Tiles of this program covering indices [lo, hi) of a range stored at staging position ``base + i``.

    Staging is cut into fixed tiles of BLOCK elements; tile ``t`` always belongs to program ``t % nprog``, whatever
    the call's sizes. That is what makes the per-program ``done`` signal enough: the bytes program p overwrites in
    call e are exactly the bytes program p of every peer read in call e-1 (same ``nprog``; a call with another
    program count waits for all, see :func:`await_previous`). Returns (first tile, end, step)."""
    pid = tl.program_id(0)
    first = (base + lo) // BLOCK
    t0 = first + (pid - first % nprog + nprog) % nprog
    return t0, tl.cdiv(base + hi, BLOCK), nprog


@triton.jit
def copy_blocks(src_ptr, dst_ptr, lo, hi, nprog, BLOCK: tl.constexpr, base=0):
    """Copy this program's tiles of indices [lo, hi) from ``src_ptr`` to ``dst_ptr`` (same indices); the range sits
    at staging position ``base + i`` (see :func:`tile_span`)."""
    t0, t1, step = tile_span(lo, hi, base, nprog, BLOCK)
    offs0 = tl.arange(0, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK - base + offs0
        mask = (offs >= lo) & (offs < hi)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def await_previous(pad_ptr, e, world, wait_all):
    """Before overwriting staging: every peer's program pid finished reading the previous call's data
    (``DONE >= e-1``). ``wait_all`` (the host sets it to the previous call's program count when that call's staging
    layout or program count differs from this one's) waits for every program of every peer instead, since tile
    ownership then changed. Returns a token (for :func:`dl.consume_token`)."""
    if wait_all != 0:
        token = dl.wait(signal_slots(pad_ptr, DONE, world, 0), world, "sys", "acquire", e - 1, cmp="ge")
        for q in range(1, wait_all):
            token = dl.wait(signal_slots(pad_ptr, DONE, world, q), world, "sys", "acquire", e - 1, cmp="ge")
    else:
        token = await_all(pad_ptr, DONE, e - 1, world)
    return token


@triton.jit
def stage_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, wait_all, sig, BLOCK: tl.constexpr):
    """The common prologue: wait until peers finished reading the previous call's staging (``DONE >= e-1``), copy my
    tiles of ``x[0:n]`` into staging, announce ``READY = e`` (with the call's signature) and wait for everyone's,
    checking their signatures. Returns ``(rank, world, nprog, e, base)`` with ``base`` the staging pointer made
    dependent on the wait."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = take_epoch(epoch_ptr)
    await_previous(pad_ptr, e, world, wait_all)
    copy_blocks(x_ptr, staging_ptr, 0, n, nprog, BLOCK)
    publish_signature(pad_ptr, sig, rank, world)
    announce(pad_ptr, READY, e, rank, world)
    token = await_all(pad_ptr, READY, e, world)
    check_signatures(pad_ptr, sig, world, token)
    base = dl.consume_token(staging_ptr, token)
    return rank, world, nprog, e, base


@triton.jit
def push_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, slot, base, wait_all, sig, BLOCK: tl.constexpr):
    """The push prologue: wait ``DONE >= e-1``, store my tiles of ``x[0:n]`` at ``staging + slot`` of every rank
    (NVLink stores; ``base`` is the staging position of index 0 for tile ownership, see :func:`tile_span`), announce
    ``READY = e`` and wait for everyone's. Returns ``(rank, world, nprog, e, staging)`` like
    :func:`stage_and_publish`."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = take_epoch(epoch_ptr)
    await_previous(pad_ptr, e, world, wait_all)
    publish_signature(pad_ptr, sig, rank, world)
    for i in range(world):
        dst = (rank + i) % world
        copy_blocks(x_ptr, dl.symm_at(staging_ptr + slot, dst), 0, n, nprog, BLOCK, base)
    announce(pad_ptr, READY, e, rank, world)
    token = await_all(pad_ptr, READY, e, world)
    check_signatures(pad_ptr, sig, world, token)
    staging = dl.consume_token(staging_ptr, token)
    return rank, world, nprog, e, staging


@triton.jit
def reduce_tiles(base, out_ptr, lo, hi, out_shift, world, nprog, BLOCK: tl.constexpr, WRITE_BACK: tl.constexpr):
    """For this program's tiles of [lo, hi): sum every rank's staging in rank order (fp32), store at
    ``out_ptr + i - out_shift`` and, with ``WRITE_BACK``, into my own staging."""
    t0, t1, step = tile_span(lo, hi, 0, nprog, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = (offs >= lo) & (offs < hi)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in range(world):
            acc += tl.load(dl.symm_at(base, peer) + offs, mask=mask).to(tl.float32)
        acc = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (offs - out_shift), acc, mask=mask)
        if WRITE_BACK:
            tl.store(base + offs, acc, mask=mask)


@triton.jit(do_not_specialize=["sig"])
def copy_engine_signal_kernel(pad_ptr, epoch_ptr, wait_all, sig, PHASE: tl.constexpr):
    """The signals of a copy-engine exchange (one program, see :func:`copy_engine_exchange`): PHASE 0 takes the
    epoch and waits ``done >= e-1``, 1 announces ``ready`` (and the call's signature ``sig``) and waits for
    everyone's, checking their signatures, 2 announces ``done``."""
    rank = dl.rank()
    world = dl.num_ranks()
    if PHASE == 0:
        e = take_epoch(epoch_ptr)
        await_previous(pad_ptr, e, world, wait_all)
    else:
        e = tl.load(epoch_ptr + 1)  # the epoch phase 0 of this call took
        if PHASE == 1:
            publish_signature(pad_ptr, sig, rank, world)
            announce(pad_ptr, READY, e, rank, world)
            check_signatures(pad_ptr, sig, world, await_all(pad_ptr, READY, e, world))
        else:
            announce(pad_ptr, DONE, e, rank, world)


def copy_engine_exchange(ctx: "CollectiveContext", x: torch.Tensor, take, sig: int) -> None:
    """Move data by DMA between three one-program signal kernels: wait until the peers read my staging of the
    previous call; ``x`` (a flat word view) into my staging; a ready round; ``take(src, staging_of_src)`` for every
    rank, starting with me (``staging_of_src``: a host-side peer view of ``src``'s staging in ``x``'s word type, for
    stream-ordered ``copy_`` out of it); then announce that I finished reading. Leaves the SMs free. ``sig``: the
    call's :func:`call_signature`, checked in the ready round."""
    world, rank = ctx.world.world_size, ctx.world.rank
    peers = ctx.peer_staging(x.dtype)
    wait_all = ctx.layout_switch("copy_engine", 1)  # x at staging[0:n]; the one signal program is pid 0
    counters = ctx.call_counters()
    copy_engine_signal_kernel[(1,)](ctx.pad, counters, wait_all, sig, PHASE=0, num_warps=1)
    peers[rank][:x.numel()].copy_(x)
    copy_engine_signal_kernel[(1,)](ctx.pad, counters, 0, sig, PHASE=1, num_warps=1)
    for i in range(world):
        src = (rank + i) % world
        take(src, peers[src])
    copy_engine_signal_kernel[(1,)](ctx.pad, counters, 0, sig, PHASE=2, num_warps=1)


_signatures: dict = {}


def call_signature(op: str, method: str, dtype: torch.dtype, numel: int, *extra) -> int:
    """The signature of a collective call (a positive int32, the same on every rank for the same op, method, dtype,
    element count and ``extra``): what the kernels compare across ranks (:func:`check_signatures`). Cached."""
    key = (op, method, str(dtype), numel, extra)
    sig = _signatures.get(key)
    if sig is None:
        sig = _signatures[key] = zlib.crc32(repr(key).encode()) & 0x7FFFFFFF
        more = "".join(f", {x}" for x in extra)
        name_signature(sig, f"{op}(method={method}, {str(dtype).replace('torch.', '')}, {numel} elements{more})")
    return sig


def _hint(op: str) -> str:
    return (f"every rank must make the same sequence of {op} calls with the same method, dtype and sizes "
            "(TRITON_DIST_DEBUG=1 checks each call on the host before launch)")


def label_pad(pad: torch.Tensor, op: str, world_size: int, history=None) -> None:
    """Label a signal pad (``[program][region][rank]`` int32, see the module docstring) for the watchdog;
    ``history()``, if given, adds the context's latest launches to the description."""
    verbs = {"READY": "reached", "REDUCED": "reduced its chunk of", "DONE": "finished reading the data of",
             "SIG": "published its signature for"}

    def describe(i, expected, seen):
        p, region, src = i // (REGIONS.value * world_size), (i // world_size) % REGIONS.value, i % world_size
        name = REGION_NAMES[region]
        text = f"{op}'s {name} signal of program {p} from rank {src}"
        if expected is not None:
            text += (f"; rank {src} has not {verbs[name]} call {expected} of this {op} context yet (it is at "
                     f"{seen}): {_hint(op)}")
        if history is not None:
            text += f". This rank's latest launches on the context (host order, newest last): {history()}"
        return text

    triton_dist.current_world().heap.label(pad, describe)


def label_words(t: torch.Tensor, op: str, names) -> None:
    """Label a small signal array: ``names(i) -> (what element i is, rank that sets it or None)``."""

    def describe(i, expected, seen):
        what, src = names(i)
        text = f"{op}'s {what}"
        if expected is not None and src is not None:
            text += f"; rank {src} has not set it for call {expected} yet (it is at {seen}): {_hint(op)}"
        return text

    triton_dist.current_world().heap.label(t, describe)


def label_headers(hdr: torch.Tensor, op: str, world_size: int, per_program: int = 0) -> None:
    """Label signature headers (``[program][2][rank]`` int64 words, :func:`send_header`; ``per_program`` 0: one
    set for the whole call)."""

    def describe(i, expected, seen):
        p, src = divmod(i, 2 * world_size)
        src %= world_size
        who = f"program {p}'s " if per_program else ""
        text = f"{op}'s {who}call header from rank {src}"
        if expected is not None:
            text += f"; rank {src} has not started call {expected} of this {op} context yet: {_hint(op)}"
        return text

    triton_dist.current_world().heap.label(hdr, describe)


def epoch_counters(programs: int, device) -> torch.Tensor:
    """Counters for :func:`take_epoch`: ``[programs, 0, 0, ...]`` (int32, ``1 + programs``)."""
    c = torch.zeros(1 + programs, dtype=torch.int32, device=device)
    c[0] = programs
    return c


@triton.jit
def scatter_and_publish(x_ptr, staging_ptr, pad_ptr, epoch_ptr, n, chunk, slot, wait_all, sig, BLOCK: tl.constexpr):
    """The push-reduction prologue: wait ``DONE >= e-1``; store chunk ``d`` of ``x[0:n]`` (``chunk`` elements each,
    the last one shorter) into slot ``rank`` (``slot`` elements apart) of rank ``d``'s staging for every peer ``d``
    (NVLink stores; my own chunk stays in ``x``); announce ``READY = e`` and wait for everyone's. Returns
    ``(rank, world, nprog, e, staging)`` like :func:`stage_and_publish`."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = take_epoch(epoch_ptr)
    await_previous(pad_ptr, e, world, wait_all)
    publish_signature(pad_ptr, sig, rank, world)
    for i in range(1, world):
        dst = (rank + i) % world
        lo = dst * chunk
        copy_blocks(x_ptr + lo, dl.symm_at(staging_ptr + rank * slot, dst), 0, tl.minimum(chunk, n - lo), nprog,
                    BLOCK)
    announce(pad_ptr, READY, e, rank, world)
    token = await_all(pad_ptr, READY, e, world)
    check_signatures(pad_ptr, sig, world, token)
    staging = dl.consume_token(staging_ptr, token)
    return rank, world, nprog, e, staging


@triton.jit
def reduce_slots(x_ptr, slots_ptr, slot, n, out_ptr, copy_ptr, rank, world, nprog, BLOCK: tl.constexpr,
                 COPY: tl.constexpr):
    """The owner's side of a push reduction: for this program's tiles of ``[0, n)``, sum slot ``src`` of
    ``slots_ptr`` (``slot`` elements apart; my own contribution read from ``x_ptr`` instead) in rank order in fp32,
    store at ``out_ptr`` and, with ``COPY``, at ``copy_ptr`` too."""
    t0, t1, step = tile_span(0, n, 0, nprog, BLOCK)
    for t in range(t0, t1, step):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for src in range(world):
            if src == rank:
                acc += tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            else:
                acc += tl.load(slots_ptr + src * slot + offs, mask=mask).to(tl.float32)
        acc = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, acc, mask=mask)
        if COPY:
            tl.store(copy_ptr + offs, acc, mask=mask)


def default_programs(world) -> int:
    """Programs per collective launch: one per SM of this rank's share of the GPU (:attr:`World.num_sms`, so the
    programs of every rank on a shared GPU are resident at once), 2 in the CPU world (the interpreter is slow)."""
    if world.interpreted:
        return 2
    return world.num_sms


class CollectiveContext:
    """Symmetric staging buffer + signal pad + epoch counters, made once and reused by every call.

    Creating a context allocates from the symmetric heap, so every rank must create the same contexts in the same
    order (the op functions in :mod:`triton_dist.ops` do this lazily on the first call with a given size).
    """

    op = "collective"  # the op's name in error messages

    def __init__(self, staging_bytes: int, num_programs: int | None = None):
        self.world = triton_dist.current_world()
        self.num_programs = num_programs or default_programs(self.world)
        self.staging_bytes = staging_bytes
        # rounded up to 16 bytes, so the staging can be viewed as any word type
        self.staging = triton_dist.empty((max(-(-staging_bytes // 16) * 16, 16),), torch.uint8)
        self.pad = triton_dist.zeros((REGIONS.value * self.num_programs * self.world.world_size,), torch.int32)
        # the latest launches (layout, programs, wait_all): layout_switch's previous call, and error messages
        self._launches: collections.deque = collections.deque(maxlen=4)
        label_pad(self.pad, self.op, self.world.world_size,
                  lambda: ", ".join(f"{lay} on {p} programs (wait_all {w})" for lay, p, w in self._launches))
        self.counters = epoch_counters(self.num_programs, self.world.device)
        self.world.barrier(f"creating a context of {self.op}")  # every pad is zero before any rank announces into it

    def programs_for(self, numel: int, block: int) -> int:
        """Programs for a call over ``numel`` elements in tiles of ``block``: one per tile, at most ``num_programs``."""
        return max(1, min(self.num_programs, -(-numel // block)))

    def tile_elems(self, nbytes: int) -> int:
        """Tile size (elements) of a reduction call: 2048 below 1 MiB (more programs for little data), 8192 above
        (more bytes in flight per program: NVLink loads wait a round trip). Part of the layout key."""
        if self.world.interpreted:
            return 1024
        return 2048 if nbytes < (1 << 20) else MAX_TILE_ELEMS

    def layout_switch(self, layout: str, programs: int | None = None) -> int:
        """The ``wait_all`` kernel argument: 0 if this call's staging layout and program count are the previous
        call's, else the previous call's program count (the kernel then waits for the DONE of every program of
        that call, see ``await_previous``)."""
        key = (layout, programs or self.num_programs)
        prev = self._launches[-1][:2] if self._launches else key
        wait_all = 0 if prev == key else prev[1]
        self._launches.append((*key, wait_all))
        return wait_all

    def staging_as(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.staging_bytes:
            raise ValueError(f"{type(self).__name__}: {numel} elements of {dtype} need {nbytes} bytes of staging, "
                             f"the context has {self.staging_bytes}; make a larger context")
        return self.staging[:nbytes].view(dtype)

    def peer_staging(self, word: torch.dtype) -> list[torch.Tensor]:
        """Every rank's staging viewed as ``word`` (host-side peer views for copy-engine copies), cached."""
        views = self.__dict__.setdefault("_peer_staging", {})
        if word not in views:
            local = self.staging.view(word)
            views[word] = [triton_dist.peer_view(local, r) for r in range(self.world.world_size)]
        return views[word]

    def call_counters(self) -> torch.Tensor:
        """The per-program epoch counters for a kernel that takes its epoch with :func:`take_epoch`."""
        return self.counters

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank closes the same contexts in the same order)."""
        self.world.barrier(f"closing a context of {self.op}")
        triton_dist.free(self.pad)
        triton_dist.free(self.staging)


class ReductionContext(CollectiveContext):
    """Context of a reduction over up to ``max_numel`` input elements of ``dtype`` (bf16, fp16 or fp32)."""

    op = "reduction"
    staging_elem_bytes = None  # bytes of staging per input element; default: the input's element size
    push_areas = 0  # chunk-sized staging areas the push methods need beyond the world slots

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        if dtype not in REDUCTION_DTYPES:
            raise TypeError(f"{self.op}: dtype {dtype} is not supported; expected bf16, fp16 or fp32")
        self.max_numel = max_numel
        self.dtype = dtype
        elem = torch.empty((), dtype=dtype).element_size()
        need = max_numel * (self.staging_elem_bytes or elem)
        world = triton_dist.current_world().world_size  # push methods: world slots (+ areas) of a chunk rounded
        slot = -(-max_numel // world) + MAX_TILE_ELEMS   # up to whole tiles
        need = max(need, (world + self.push_areas) * slot * elem)
        super().__init__(need, num_programs=num_programs)

    def check(self, x: torch.Tensor) -> None:
        check_collective_input(x, self.op, REDUCTION_DTYPES)
        if x.dtype != self.dtype or x.numel() > self.max_numel:
            raise ValueError(f"{self.op}: context is for up to {self.max_numel} elements of {self.dtype}, got "
                             f"{x.numel()} of {x.dtype}")


def check_collective_input(x: torch.Tensor, what: str, dtypes) -> None:
    world = triton_dist.current_world()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device != world.device and not (x.device.type == world.device.type == "cuda"
                                         and x.device.index == world.device.index):
        raise ValueError(f"{what}: tensor is on {x.device}, expected this rank's device {world.device}")
    if x.dtype not in dtypes:
        raise TypeError(f"{what}: dtype {x.dtype} is not supported; expected one of "
                        f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    if not x.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (call .contiguous() first)")


@triton.jit
def last_to_arrive(counter_ptr):
    """Count this program as finished (its memory operations ordered before, system-wide); True for the last one of
    the launch to arrive, which also resets the counter for the next launch (the EP kernels' and p2p's "the last
    program publishes")."""
    tl.debug_barrier()
    dl.fence("sys", "acq_rel")
    old = dl.atomic_add(counter_ptr, 1, "gpu", "acq_rel")
    last = old == tl.num_programs(0) - 1
    if last:
        tl.store(counter_ptr, 0)
        dl.fence("sys", "acq_rel")
    return last


def free_symmetric(world, op: str, tensors) -> None:
    """Free a context's symmetric ``tensors`` (collective: every rank closes its contexts in the same order, so the
    barrier first keeps a peer from writing into memory that is being handed back)."""
    world.barrier(f"closing a context of {op}")
    for t in tensors:
        triton_dist.free(t)
