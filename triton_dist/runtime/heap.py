"""The symmetric heap: one equally sized byte arena per rank, every rank's arena visible to every rank.

Allocation is *collective by convention*: every rank calls :meth:`SymmetricHeap.empty` and
:meth:`SymmetricHeap.free` in the same order with the same sizes, so an object lives at the same
offset in every rank's arena. A device pointer into the local arena is translated to the same
object on ``peer`` by ``base[peer] + (ptr - base[rank])`` (``dl.symm_at``); :meth:`peer_view`
does the same on the host. With ``TRITON_DIST_DEBUG=1`` each allocation is checked against all
ranks and a differing sequence raises :class:`AllocationMismatch`.

Backends provide the arenas:

* ``cpu``: a file in ``/dev/shm`` per rank, mapped by every process (the interpreter world);
* ``cuda``: one PyTorch symmetric-memory tensor (CUDA IPC) per rank;
* ``cuda`` with ranks sharing a GPU: :class:`SharedGPUArena`, one ``cuMemAlloc`` per rank opened by the others
  through CUDA IPC handles (PyTorch's symmetric memory refuses ranks on one device);
* ``nvshmem``: the same from PyTorch's NVSHMEM backend, so ``libshmem_device`` calls work on it.

The first ``RESERVED_BYTES`` of every arena are never handed out; the runtime's own signals live there
(zeroed by ``init``, offsets in bytes):

=========================  ====================================================================
``SHMEM_BARRIER_SLOTS``    int64 per PE: the epoch of PE ``p``'s last ``libshmem_device.barrier_all``
``SHMEM_BARRIER_COUNTER``  int64: this rank's own barrier_all epoch (GPU bodies; the CPU world counts on the host)
``STREAM_BARRIER_SLOTS``   int64 per rank: the epoch of rank ``r``'s last device ``stream_barrier``
``STREAM_BARRIER_COUNTER`` int64: this rank's own stream_barrier epoch
=========================  ====================================================================
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; every allocation starts on this boundary (TMA and 16-byte vectors need <= 128)
RESERVED_BYTES = 64 << 10  # start of every arena: runtime signal pads (barriers), never handed out
RESERVED_PAD_BYTES = 4096  # the part of it that init() zeroes (the layout below)
SHMEM_BARRIER_SLOTS = 0
SHMEM_BARRIER_COUNTER = 512
STREAM_BARRIER_SLOTS = 1024
STREAM_BARRIER_COUNTER = 1536

SUPPORTED_DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2,
)


class HeapExhausted(MemoryError):
    """The symmetric heap has no free range large enough for an allocation."""


class AllocationMismatch(RuntimeError):
    """Ranks allocated different sequences from the symmetric heap (found with TRITON_DIST_DEBUG=1)."""


class NotSymmetric(ValueError):
    """A tensor passed where a symmetric-heap tensor was expected lies outside the heap."""


@dataclass
class _Block:
    offset: int
    nbytes: int


def fmt_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that fits, e.g. ``1.5 GiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class SymmetricHeap:
    """Allocator over the arenas; backend objects supply ``peer_bytes`` (uint8 tensors) and ``bases``."""

    def __init__(self, arena, rank: int, world_size: int, group, debug: bool = False):
        self.arena = arena
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.debug = debug
        self.nbytes = arena.nbytes
        self.bases = list(arena.bases)  # address of each rank's arena as seen from this process
        self._peers = [arena.peer_bytes(r) for r in range(world_size)]
        self._free = [_Block(RESERVED_BYTES, self.nbytes - RESERVED_BYTES)]
        self._live: dict[int, _Block] = {}  # data_ptr -> block
        self._labels: dict[int, tuple] = {}  # offset -> (bytes, element size, describe): see label()
        self._seq = 0

    # ----------------------------------------------------------------- allocation
    @property
    def local(self) -> torch.Tensor:
        """This rank's whole arena as a uint8 tensor."""
        return self._peers[self.rank]

    @property
    def bytes_in_use(self) -> int:
        return sum(b.nbytes for b in self._live.values())

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size([shape] if isinstance(shape, int) else shape)
        if dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise TypeError(f"triton_dist.empty: dtype {dtype} is not supported; expected one of {names}")
        if any(s < 0 for s in shape):
            raise ValueError(f"triton_dist.empty: negative dimension in shape {tuple(shape)}")
        elem = torch.empty((), dtype=dtype).element_size()
        nbytes = max(shape.numel() * elem, 1)
        padded = -(-nbytes // ALIGN) * ALIGN
        block = self._take(padded, shape, dtype)
        self._check_sequence("empty", block.offset, padded, tuple(shape), dtype)
        t = self.local[block.offset:block.offset + shape.numel() * elem].view(dtype).view(shape)
        self._live[t.data_ptr()] = block
        return t

    def _take(self, padded: int, shape, dtype) -> _Block:
        for i, blk in enumerate(self._free):
            if blk.nbytes >= padded:
                out = _Block(blk.offset, padded)
                if blk.nbytes == padded:
                    del self._free[i]
                else:
                    self._free[i] = _Block(blk.offset + padded, blk.nbytes - padded)
                return out
        largest = max((b.nbytes for b in self._free), default=0)
        raise HeapExhausted(
            f"symmetric heap exhausted on rank {self.rank}: asked for {fmt_bytes(padded)} "
            f"(shape {tuple(shape)}, {dtype}); heap is {fmt_bytes(self.nbytes)}, "
            f"{fmt_bytes(self.bytes_in_use)} in use, largest free range {fmt_bytes(largest)}. "
            f"Free tensors with triton_dist.free(t) or grow the heap: TRITON_DIST_HEAP_SIZE=4G "
            f"(or triton_dist.init(heap_size=...)).")

    def free(self, t: torch.Tensor) -> None:
        """Return ``t``'s range to the heap; call on every rank in the same order as ``empty``."""
        block = self._live.pop(t.data_ptr(), None)
        if block is None:
            raise NotSymmetric("triton_dist.free: tensor was not returned by triton_dist.empty/zeros "
                               "(or was freed already); pass the tensor itself, not a view at another offset")
        self._check_sequence("free", block.offset, block.nbytes, tuple(t.shape), t.dtype)
        self._labels.pop(block.offset, None)
        self._free.append(block)
        self._free.sort(key=lambda b: b.offset)
        merged: list[_Block] = []
        for b in self._free:
            if merged and merged[-1].offset + merged[-1].nbytes == b.offset:
                merged[-1].nbytes += b.nbytes
            else:
                merged.append(_Block(b.offset, b.nbytes))
        self._free = merged

    def _check_sequence(self, op, offset, nbytes, shape, dtype) -> None:
        self._seq += 1
        if not self.debug or self.world_size == 1:
            return
        import torch.distributed as dist
        mine = (self._seq, op, offset, nbytes, shape, str(dtype))
        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        for r, theirs in enumerate(every):
            if theirs != mine:
                raise AllocationMismatch(
                    f"symmetric allocation #{self._seq} differs across ranks: rank {self.rank} did "
                    f"{op}(shape={shape}, dtype={dtype}, bytes={nbytes}) at offset {offset}, rank {r} did "
                    f"{theirs[1]}(shape={theirs[4]}, dtype={theirs[5]}, bytes={theirs[3]}) at offset {theirs[2]}. "
                    "Every rank must allocate and free symmetric tensors in the same order with the same sizes.")

    # ------------------------------------------------------------------ addressing
    def offset_of(self, t: torch.Tensor, what: str = "tensor") -> int:
        """Byte offset of ``t``'s first element in this rank's arena; raises if outside the heap."""
        ptr = t.data_ptr()
        base = self.bases[self.rank]
        span = (t.numel() and (max((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1)) * t.element_size()
        if not (base <= ptr and ptr + span <= base + self.nbytes) or t.device != self.local.device:
            raise NotSymmetric(
                f"{what} at 0x{ptr:x} ({tuple(t.shape)}, {t.dtype}, {t.device}) is not on rank {self.rank}'s "
                f"symmetric heap [0x{base:x}, 0x{base + self.nbytes:x}); allocate it with triton_dist.empty/zeros")
        return ptr - base

    def peer_view(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """The same symmetric object on ``peer``'s arena, same shape and strides, usable on the host."""
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer_view: peer must be in [0, {self.world_size}), got {peer}")
        off = self.offset_of(t, "peer_view: tensor")
        if off % t.element_size():
            raise ValueError(f"peer_view: offset {off} is not a multiple of the element size {t.element_size()}")
        typed = self._peers[peer].view(t.dtype)
        return typed.as_strided(t.shape, t.stride(), off // t.element_size())

    # ------------------------------------------------------------------ error messages
    def label(self, t: torch.Tensor, describe) -> None:
        """Name the words of symmetric tensor ``t`` for the watchdog's messages: ``describe(index, expected, seen)``
        says what element ``index`` of ``t`` is (e.g. "all_reduce: program 0's READY signal from rank 2") and, given
        the value a timed-out wait expected and the one it last saw, what that means and what to check. Every rank
        labels the same tensors (offsets are symmetric), so a wait on any rank's copy is named. Dropped by free()."""
        self._labels[self.offset_of(t, "label: tensor")] = (t.numel() * t.element_size(), t.element_size(), describe)

    def describe_address(self, addr: int) -> str:
        """``addr`` as "rank r's heap offset o", or as a raw address outside every heap."""
        for r, base in enumerate(self.bases):
            if base <= addr < base + self.nbytes:
                return f"rank {r}'s heap offset {addr - base}"
        return f"address 0x{addr:x} (outside the symmetric heap)"

    def label_of(self, addr: int, expected=None, seen=None) -> str | None:
        """What the labelled word at ``addr`` (on any rank's heap) is, given what a wait on it expected and last saw
        (see :meth:`label`); ``None`` for an unlabelled address."""
        for base in self.bases:
            if base <= addr < base + self.nbytes:
                off = addr - base
                for start, (nbytes, elem, describe) in self._labels.items():
                    if start <= off < start + nbytes:
                        try:
                            return describe((off - start) // elem, expected, seen)
                        except Exception as e:  # a message must never hide the error it reports
                            return f"(its label failed: {e!r})"
        return None

    def timeout_message(self, rank: int, timeout_s, addr: int, what, expected, seen, program: str) -> str:
        """The message of a wait on ``addr`` that timed out (the GPU watchdog's and the CPU world's)."""
        text = (f"rank {rank} waited {timeout_s} s on the signal at {self.describe_address(addr)} for value {what}, "
                f"last saw {seen}{program}")
        label = self.label_of(addr, expected, seen)
        if label is not None:
            return f"{text}. That signal is {label}. If the peer is only slow, raise TRITON_DIST_WAIT_TIMEOUT_S."
        return f"{text}; a peer never sent it (check the signal protocol, or raise TRITON_DIST_WAIT_TIMEOUT_S)."

    def close(self) -> None:
        self._peers = []
        self._live.clear()
        self._labels.clear()
        self.arena.close()


# ---------------------------------------------------------------------------- backends
class CPUArena:
    """Per-rank ``/dev/shm`` files, each mapped into every process of the CPU world."""

    def __init__(self, nbytes: int, rank: int, world_size: int, run_id: str, barrier):
        self.nbytes = nbytes
        names = [f"/dev/shm/triton_dist_{run_id}_{r}" for r in range(world_size)]
        fd = os.open(names[rank], os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        barrier()  # every file exists
        self._maps = []
        for name in names:
            fd = os.open(name, os.O_RDWR)
            try:
                self._maps.append(mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            finally:
                os.close(fd)
        barrier()  # every process mapped every file: unlink now, so nothing leaks even on a crash
        os.unlink(names[rank])
        self._tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self.bases = [t.data_ptr() for t in self._tensors]

    def peer_bytes(self, r: int) -> torch.Tensor:
        return self._tensors[r]

    def close(self) -> None:
        self._tensors = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a tensor still references it; the mapping dies with the process
                pass
        self._maps = []


class CUDAArena:
    """One PyTorch symmetric-memory buffer per rank (CUDA IPC, or NVSHMEM when ``nvshmem=True``)."""

    def __init__(self, nbytes: int, device: torch.device, group, nvshmem: bool):
        import torch.distributed._symmetric_memory as symm_mem
        if nvshmem:
            if not symm_mem.is_nvshmem_available():
                raise RuntimeError("backend 'nvshmem' asked for, but PyTorch reports NVSHMEM unavailable; "
                                   "use TRITON_DIST_BACKEND=cuda")
            # NVSHMEM reserves its symmetric heap at the first allocation: make room for ours.
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(nbytes + (512 << 20)))
            symm_mem.set_backend("NVSHMEM")
        self.nbytes = nbytes
        self.buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group=group.group_name)
        self.bases = [int(p) for p in self.handle.buffer_ptrs]

    def peer_bytes(self, r: int) -> torch.Tensor:
        if r == self.handle.rank:
            return self.buffer
        return self.handle.get_buffer(r, (self.nbytes,), torch.uint8, 0)

    def close(self) -> None:
        self.buffer = None
        self.handle = None


class SharedGPUArena:
    """Heaps of ranks that share GPUs: each rank ``cuMemAlloc``s its arena, exports a CUDA IPC handle, and opens
    every peer's (all-gathered over ``group``, gloo). Driver calls, not PyTorch's caching allocator, so the arena is
    one plain allocation whatever ``PYTORCH_CUDA_ALLOC_CONF`` says, and teardown is ours: close the peers' mappings,
    wait until every rank did, then free."""

    def __init__(self, nbytes: int, device: torch.device, group):
        import torch.distributed as dist

        from . import _cuda_driver as drv
        self.nbytes = nbytes
        self.device = device
        self.group = group
        self.rank = dist.get_rank(group)
        torch.cuda.synchronize(device)  # the primary context is current on this thread
        self._own = drv.mem_alloc(nbytes)
        self._opened: list[int] = []
        try:
            handle = drv.ipc_get_mem_handle(self._own)
            every = [None] * dist.get_world_size(group)
            dist.all_gather_object(every, handle, group=group)
            self.bases = []
            for r, h in enumerate(every):
                if r == self.rank:
                    self.bases.append(self._own)
                else:
                    self.bases.append(drv.ipc_open_mem_handle(h))
                    self._opened.append(self.bases[-1])
        except BaseException:
            self._release()
            raise
        self._tensors = [_device_bytes(b, nbytes, device) for b in self.bases]

    def peer_bytes(self, r: int) -> torch.Tensor:
        return self._tensors[r]

    def _release(self) -> None:
        from . import _cuda_driver as drv
        for ptr in self._opened:
            drv.ipc_close_mem_handle(ptr)
        self._opened = []

    def close(self) -> None:
        import torch.distributed as dist

        from . import _cuda_driver as drv
        if self._own is None:
            return
        self._tensors = []
        torch.cuda.synchronize(self.device)
        self._release()
        dist.barrier(group=self.group)  # no peer maps my arena any more
        drv.mem_free(self._own)
        self._own = None


class _CudaBytes:
    """A raw device allocation as ``__cuda_array_interface__``, so ``torch.as_tensor`` wraps it without a copy."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None, "stream": None}


def _device_bytes(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(_CudaBytes(ptr, nbytes), device=device)
    assert t.data_ptr() == ptr and t.dtype == torch.uint8 and t.numel() == nbytes
    return t
