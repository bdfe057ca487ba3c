"""Point-to-point send / recv between two ranks (pipeline-parallel activations): NVLink stores into the receiver's
symmetric slot, a flag raised with the call's epoch, no host sync, CUDA-graph capturable.

Shards: ``send(x, dst)`` on rank ``s`` and ``recv(src=s, shape=x.shape)`` on rank ``dst`` move ``x`` (any dtype of the
symmetric heap, as raw words, bit-exact) from ``s`` to ``dst`` (``torch.distributed.send`` / ``recv``). Sizes must
agree in element count, as torch's; the call's signature (dtype, element count) travels with it and a receiver that
expects another size stops with ``CallMismatch`` instead of returning garbage.

Buffers of a :class:`P2PContext` (symmetric, ``W`` ranks; two of each by call parity, so call ``e + 1`` never writes
where call ``e`` may still be read):

========================  =================  ===================================================================
``buf [2, W, slot]``      at the receiver    words of rank ``s``'s call ``e`` at ``[e % 2, s]`` (a slot: ``max_numel``
                                             elements rounded up to 256 bytes, so every slot is aligned for vectors)
``flag [2, W]`` int32     at the receiver    epoch: rank ``s``'s words (and signature) of call ``e`` are here
``sig [2, W]`` int32      at the receiver    the signature of rank ``s``'s call ``e``
``done [W]`` int32        at the sender      epoch: rank ``d`` finished reading call ``e`` of mine
========================  =================  ===================================================================

Epochs count the calls of one direction of one pair: ``send_epoch[d]`` (local, sender) and ``recv_epoch[s]``
(local, receiver) are bumped on the device by the last program of each call, so they stay equal on both sides as
long as every ``send(x, d)`` on ``s`` is matched by one ``recv(s)`` on ``d``, in order; nothing is ever reset, which
keeps back-to-back calls and CUDA-graph replays correct without a host op per call.

Protocol, call ``e`` from ``s`` to ``d`` (parity ``p = e % 2``), two kernels, each with up to ``num_programs``
programs over tiles of words:

1. send, on ``s``: every program waits ``done[d] >= e - 2`` (``d`` finished reading the parity-``p`` slot two calls
   ago), stores its tiles into ``buf[p, s]`` of ``d`` (NVLink stores through ``dl.symm_at``) and arrives on a local
   counter; the last program to arrive writes the signature into ``sig[p, s]`` of ``d``, fences once (system scope)
   and sets ``flag[p, s] = e`` on ``d``. The host never waits; the kernel waits for the receiver only when both
   slots are still unread: sends run up to two calls ahead of their recvs, so two ranks may send to each other
   first and receive second.
2. recv, on ``d``: every program waits ``flag[p, s] >= e``, compares ``sig[p, s]`` with its own call's signature
   (``dl.check_agree``), copies its tiles of ``buf[p, s]`` into ``out`` and arrives; the last one sets
   ``done[d] = e`` on ``s``.

No program waits for another program of its own launch, so the CPU world's interpreter (programs one at a time, in
pid order; ranks in separate processes) makes progress. The flags are labelled for the hang watchdog: a recv whose
send never comes names the peer, the call and the rule. Calls of one context are ordered by one stream.

The GPU path (memory ordering of the NVLink stores before the flag, graph capture and replay) follows the low-latency
EP kernels' (fence, then a relaxed flag store; acquire waits). On one H200 with 2 ranks sharing it (seventh session)
the exactness, bad-input and graph-replay / stress tests of ``tests/test_pipeline.py`` passed; the two-stage model
over these kernels (``allreduce`` mode) hung once and failed once there, not diagnosed yet. Reference:
:func:`send_reference` / :func:`recv_reference` (``torch.distributed`` over the world's process group: gloo in the CPU
world, through the host).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl
from triton_dist.runtime.heap import SUPPORTED_DTYPES

from ._common import (SIGNATURE_CHECK, call_signature, check_collective_input, default_programs, free_symmetric,
                      last_to_arrive)

OP = "p2p"


# ---------------------------------------------------------------------------------------------- device side
@triton.jit
def _copy_tiles(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """This program's tiles (``pid, pid + nprog, ...``) of ``n`` words from ``src_ptr`` to ``dst_ptr``."""
    offs0 = tl.arange(0, BLOCK)
    for t in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = t * BLOCK + offs0
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["peer", "sig"])
def _send_kernel(x_ptr, buf_ptr, flag_ptr, sig_ptr, done_ptr, epoch_ptr, arrive_ptr, peer, n, slot, sig,
                 BLOCK: tl.constexpr):
    """Step 1 of the module docstring: ``n`` words of ``x`` into slot ``[e % 2, me]`` of ``peer``'s buffer."""
    me = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr + peer) + 1
    p = e % 2
    token = dl.wait(done_ptr + peer, 1, "sys", "acquire", e - 2, cmp="ge")
    dst = dl.symm_at(dl.consume_token(buf_ptr, token) + (p * world + me).to(tl.int64) * slot, peer)
    _copy_tiles(x_ptr, dst, n, BLOCK)
    if last_to_arrive(arrive_ptr):
        tl.store(dl.symm_at(sig_ptr + p * world + me, peer), sig)
        tl.debug_barrier()
        dl.fence("sys", "acq_rel")  # the words of every program (ordered by the arrivals) and the signature
        dl.notify(flag_ptr + p * world + me, peer, e, "set", "intra_node", semantic="relaxed")
        tl.store(epoch_ptr + peer, e)


@triton.jit(do_not_specialize=["peer", "sig"])
def _recv_kernel(out_ptr, buf_ptr, flag_ptr, sig_ptr, done_ptr, epoch_ptr, arrive_ptr, peer, n, slot, sig,
                 BLOCK: tl.constexpr):
    """Step 2 of the module docstring: ``n`` words of slot ``[e % 2, peer]`` of my buffer into ``out``."""
    me = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr + peer) + 1
    p = e % 2
    token = dl.wait(flag_ptr + p * world + peer, 1, "sys", "acquire", e, cmp="ge")
    dl.check_agree(sig, tl.load(dl.consume_token(sig_ptr, token) + p * world + peer), peer, SIGNATURE_CHECK)
    src = dl.consume_token(buf_ptr, token) + (p * world + peer).to(tl.int64) * slot
    _copy_tiles(src, out_ptr, n, BLOCK)
    if last_to_arrive(arrive_ptr):  # its fence orders every program's loads before the release below
        dl.notify(done_ptr + me, peer, e, "set", "intra_node", semantic="relaxed")
        tl.store(epoch_ptr + peer, e)


# ---------------------------------------------------------------------------------------------- host side
def _words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a flat view of the widest integer words dividing its bytes."""
    flat = t.reshape(-1).view(torch.uint8)
    for word, size in ((torch.int32, 4), (torch.int16, 2)):
        if flat.numel() % size == 0:
            return flat.view(word)
    return flat


class P2PContext:
    """Slots and flags for sends and recvs of up to ``max_numel`` elements of ``dtype`` between any two ranks
    (module docstring). Collective to make and to :meth:`close` (symmetric allocations): every rank makes the same
    contexts in the same order, then each pair of ranks uses it independently. Symmetric memory per rank: about
    ``2 * world * max_numel`` elements (a slot per sender and parity). ``num_programs``: the most programs a call
    launches (default: one per SM, 2 in the CPU world)."""

    op = OP

    def __init__(self, max_numel: int, dtype: torch.dtype, num_programs: int | None = None):
        what = type(self).__name__
        if not isinstance(max_numel, int) or isinstance(max_numel, bool) or max_numel < 1:
            raise ValueError(f"{what}: max_numel must be an int >= 1, got {max_numel!r}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what}: dtype {dtype} is not supported; expected one of "
                            f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)}")
        if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
            raise ValueError(f"{what}: num_programs must be an int >= 1, got {num_programs!r}")
        self.world = triton_dist.current_world()
        self.max_numel, self.dtype = max_numel, dtype
        self.num_programs = num_programs or default_programs(self.world)
        self.block = 1024 if self.world.interpreted else 2048  # words per tile
        w = self.world.world_size
        nbytes = max_numel * torch.empty((), dtype=dtype).element_size()
        # whole 256-byte units: every slot starts 256-byte aligned, and its size in words is a multiple of 16 (a
        # kernel argument Triton specialises), so the copies stay 16-byte vectors
        self.slot_bytes = -(-nbytes // 256) * 256
        i32 = torch.int32
        self.buf = triton_dist.empty((2 * w * self.slot_bytes,), torch.uint8)
        self.flag = triton_dist.zeros((2, w), i32)
        self.sig = triton_dist.zeros((2, w), i32)
        self.done = triton_dist.zeros((w,), i32)
        self._symmetric = [self.buf, self.flag, self.sig, self.done]
        dev = self.world.device
        self.send_epoch = torch.zeros(w, dtype=i32, device=dev)  # calls sent to each rank
        self.recv_epoch = torch.zeros(w, dtype=i32, device=dev)  # calls received from each rank
        self.arrivals = torch.zeros(2, dtype=i32, device=dev)  # the send kernel's, the recv kernel's
        self._label()
        self._closed = False
        self.world.barrier(f"creating a context of {self.op}")  # every flag is zero before any rank raises one

    def _label(self) -> None:
        w = self.world.world_size
        rule = ("every send(x, dst) on a rank needs a matching recv(src) on dst, in the same order and with the same "
                "element count")

        def flag(i, expected, seen):
            src = i % w
            text = f"{self.op}'s flag (parity {i // w}) of sends from rank {src}: its words are in this rank's slot"
            if expected is not None:
                text += (f"; rank {src} has not sent call {expected} to this rank yet (the flag holds call {seen}): "
                         f"{rule}")
            return text

        def done(i, expected, seen):
            text = f"{self.op}'s done flag of rank {i}: it finished reading what this rank sent it"
            if expected is not None:
                text += (f"; rank {i} has not received call {expected} from this rank yet (it is at {seen}), so "
                         f"this rank cannot overwrite that slot: {rule}")
            return text

        heap = self.world.heap
        heap.label(self.flag, flag)
        heap.label(self.done, done)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the context was closed")

    def _check_peer(self, what: str, name: str, peer) -> int:
        w, me = self.world.world_size, self.world.rank
        if not isinstance(peer, int) or isinstance(peer, bool):
            raise TypeError(f"{what}: {name} must be a rank (int), got {type(peer).__name__}")
        if not 0 <= peer < w:
            raise ValueError(f"{what}: {name} = {peer} is not a rank of this world of {w}")
        if peer == me:
            raise ValueError(f"{what}: {name} = {peer} is this rank; a rank cannot send to itself (copy instead)")
        return peer

    def _check_size(self, what: str, numel: int, dtype: torch.dtype) -> None:
        if dtype != self.dtype or numel > self.max_numel:
            raise ValueError(f"{what}: the context is for up to {self.max_numel} elements of {self.dtype}, got "
                             f"{numel} of {dtype}; make a context of that dtype / a larger one")

    def _grid(self, words: int) -> tuple[int]:
        return (max(1, min(self.num_programs, -(-words // self.block))),)

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send ``x`` (contiguous, the context's dtype, at most ``max_numel`` elements) to rank ``dst``, whose
        matching :meth:`recv` gets it. Returns once the kernel is queued (no host sync); ``x`` may be reused as soon as
        the stream has run the kernel. Waits on the device only if ``dst`` has not yet received the call before the
        previous one."""
        what = f"{self.op}.send"
        self._check_open(what)
        check_collective_input(x, what, SUPPORTED_DTYPES)
        dst = self._check_peer(what, "dst", dst)
        self._check_size(what, x.numel(), x.dtype)
        words = _words(x)
        n = words.numel()
        sig = call_signature(self.op, "nvlink", x.dtype, x.numel())
        _send_kernel[self._grid(n)](words, self.buf.view(words.dtype), self.flag, self.sig, self.done,
                                    self.send_epoch, self.arrivals, dst, n, self.slot_bytes // words.element_size(),
                                    sig, BLOCK=self.block, num_warps=4)

    def recv(self, src: int, *, shape=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Receive the tensor that rank ``src`` sends with the matching :meth:`send`: into ``out`` (contiguous, the
        context's dtype) if given, else into a new tensor of ``shape``; returns it. No host sync."""
        what = f"{self.op}.recv"
        self._check_open(what)
        src = self._check_peer(what, "src", src)
        if out is None:
            if shape is None:
                raise ValueError(f"{what}: give the shape of the tensor to receive, or out")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"{what}: shape must be a tuple of ints >= 0, got {shape!r}")
            numel = 1
            for s in shape:
                numel *= s
            self._check_size(what, numel, self.dtype)
            out = torch.empty(shape, dtype=self.dtype, device=self.world.device)
        else:
            check_collective_input(out, f"{what}: out", SUPPORTED_DTYPES)
            if shape is not None and tuple(out.shape) != ((shape,) if isinstance(shape, int) else tuple(shape)):
                raise ValueError(f"{what}: shape {shape!r} and out's shape {tuple(out.shape)} differ")
            self._check_size(what, out.numel(), out.dtype)
        words = _words(out)
        n = words.numel()
        sig = call_signature(self.op, "nvlink", self.dtype, out.numel())
        _recv_kernel[self._grid(n)](words, self.buf.view(words.dtype), self.flag, self.sig, self.done,
                                    self.recv_epoch, self.arrivals[1:], src, n,
                                    self.slot_bytes // words.element_size(), sig, BLOCK=self.block, num_warps=4)
        return out

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank closes its contexts in the same order)."""
        if self._closed:
            return
        free_symmetric(self.world, self.op, self._symmetric)
        self._closed = True


def send(x: torch.Tensor, dst: int, *, ctx: P2PContext) -> None:
    """:meth:`P2PContext.send`."""
    ctx.send(x, dst)


def recv(src: int, *, ctx: P2PContext, shape=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`P2PContext.recv`."""
    return ctx.recv(src, shape=shape, out=out)


# ---------------------------------------------------------------------------------------------- references
def _via_host(world, t: torch.Tensor) -> bool:
    """Gloo (the CPU world's and a shared-GPU world's host backend) sends CPU tensors only."""
    return t.is_cuda and world.host_backend == "gloo"


def send_reference(x: torch.Tensor, dst: int) -> None:
    """``torch.distributed.send`` over the world's process group (blocking; through the host under gloo)."""
    world = triton_dist.current_world()
    x = x.contiguous()
    dist.send(x.cpu() if _via_host(world, x) else x, dst, group=world.group)


def recv_reference(src: int, *, shape=None, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.distributed.recv`` into ``out`` or a new tensor of ``shape`` and ``dtype``; returns it."""
    world = triton_dist.current_world()
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=world.device)
    if _via_host(world, out):
        host = torch.empty(out.shape, dtype=out.dtype)
        dist.recv(host, src, group=world.group)
        return out.copy_(host)
    dist.recv(out, src, group=world.group)
    return out
