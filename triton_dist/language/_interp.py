"""CPU-world bodies of the device API, used under ``TRITON_INTERPRET=1``.

Triton's interpreter runs a kernel as Python, one program after another, with numpy arrays of raw addresses
for pointers. The ranks of a CPU world are processes whose symmetric heaps are shared-memory files mapped into
every process, so peer addresses are ordinary host addresses and a store by one process is seen by the others.
A program acts as one thread here: ``tid`` is 0, scopes and fences have no effect, and spin-waits sleep
between polls. A wait that outlives ``TRITON_DIST_WAIT_TIMEOUT_S`` raises :class:`SignalTimeout` naming the
rank, the signal (owner rank and heap offset), the expected and the last seen value.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interpreter
from triton.runtime.interpreter import TensorHandle

from ..runtime.errors import CallMismatch, describe_mismatch
from ..runtime.world import current_world

_CTYPES = {tl.int32: ctypes.c_int32, tl.uint32: ctypes.c_uint32, tl.int64: ctypes.c_int64, tl.uint64: ctypes.c_uint64}
_SCOPES = ("cta", "gpu", "sys", "intra_node", "inter_node", "system")


def _c(x):
    return x.value if isinstance(x, tl.constexpr) else x


def _int(x) -> int:
    x = _c(x)
    return int(np.asarray(x.handle.data).reshape(-1)[0]) if isinstance(x, tl.tensor) else int(x)


def _check_scope(scope):
    if _c(scope) not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {_c(scope)!r}")


def _word_type(ptr):
    if not (isinstance(ptr, tl.tensor) and ptr.dtype.is_ptr()):
        raise TypeError(f"expected a pointer (scalar or block), got {ptr!r}")
    ty = ptr.dtype.element_ty
    if ty not in _CTYPES:
        raise TypeError(f"signals and ld/st words must be int32, uint32, int64 or uint64, got pointer to {ty}")
    return ty


_NP = {tl.int32: np.int32, tl.int64: np.int64, tl.uint32: np.uint32, tl.uint64: np.uint64}


def _scalar(value, dtype):
    return tl.tensor(TensorHandle(np.array(value, dtype=_NP[dtype]), dtype), dtype)


def rank():
    """This rank's index in the world (int32)."""
    return _scalar(current_world().rank, tl.int32)


def num_ranks():
    """Number of ranks in the world (int32)."""
    return _scalar(current_world().world_size, tl.int32)


def symm_at(ptr, peer):
    """Address of the symmetric object ``ptr`` (local heap) on rank ``peer``."""
    world = current_world()
    bases = np.array(world.heap.bases, dtype=np.uint64)
    peers = np.asarray(peer.handle.data if isinstance(peer, tl.tensor) else _c(peer)).astype(np.int64)
    if np.any(peers < 0) or np.any(peers >= world.world_size):
        raise ValueError(f"symm_at: peer {peers} outside [0, {world.world_size})")
    addrs = ptr.handle.data.astype(np.uint64)
    heap = world.heap
    local = bases[world.rank]
    if np.any(addrs < local) or np.any(addrs >= local + np.uint64(heap.nbytes)):
        bad = int(np.asarray(addrs).flat[0])
        raise ValueError(f"symm_at: pointer 0x{bad:x} is not in rank {world.rank}'s symmetric heap; "
                         "allocate the buffer with triton_dist.empty/zeros")
    new = bases[peers] + (addrs - local)
    return tl.tensor(TensorHandle(np.asarray(new, dtype=np.uint64).reshape(addrs.shape), ptr.handle.dtype), ptr.type)


def spin(addr: int, cty, done, what: str, timeout_s: float, expected=None, shown=lambda v: v):
    """Poll the word at ``addr`` until ``done(value)``; raise :class:`SignalTimeout` after ``timeout_s`` (``what``:
    the condition in words; ``expected`` and ``shown(last value)`` go to the heap label's description)."""
    cell = cty.from_address(addr)
    deadline = time.monotonic() + timeout_s
    polls = 0
    while not done(seen := cell.value):
        polls += 1
        if polls > 64:
            time.sleep(0.0002)
        if time.monotonic() > deadline:
            w = current_world()
            raise w.timeout_error(w.heap.timeout_message(w.rank, f"{timeout_s:g}", addr, what, expected,
                                                         shown(seen), _program_note()), timeout_s, wait_s=1.0)
    return seen


def _program_note() -> str:
    """Which program of the launch waited; when later programs exist, the CPU world's pid order as a likely cause."""
    b = _interpreter.interpreter_builder
    idx, dim = getattr(b, "grid_idx", None), getattr(b, "grid_dim", None)
    if idx is None or dim is None:
        return ""
    pid, n = idx[0] + dim[0] * (idx[1] + dim[1] * idx[2]), dim[0] * dim[1] * dim[2]
    note = f" (program {pid} of {n})"
    if pid < n - 1:
        note += (" -- in the CPU world the programs of a launch run one at a time in pid order, so a wait for a later "
                 "program of the same launch never ends: order the kernel so that producers come first")
    return note


def wait(signal_ptrs, num_signals=1, scope="sys", semantic="acquire", wait_value=1, cmp="eq"):
    """Spin until ``num_signals`` consecutive signals from ``signal_ptrs`` each equal (``cmp="ge"``: reach)
    ``wait_value``."""
    _check_scope(scope)
    cmp = _c(cmp)
    if cmp not in ("eq", "ge"):
        raise ValueError(f"wait: cmp must be 'eq' or 'ge', got {cmp!r}")
    if signal_ptrs.type.is_block():
        raise TypeError("dl.wait takes the first signal's scalar pointer and num_signals (consecutive signals), "
                        "not a block of pointers")
    ty = _word_type(signal_ptrs)
    cty = _CTYPES[ty]
    addr0, expected = _int(signal_ptrs), _int(wait_value) & ((1 << (8 * ctypes.sizeof(cty))) - 1)
    if ty in (tl.int32, tl.int64) and expected >= 1 << (8 * ctypes.sizeof(cty) - 1):
        expected -= 1 << (8 * ctypes.sizeof(cty))
    timeout = current_world().config.wait_timeout_s
    for i in range(_int(num_signals)):
        if cmp == "eq":
            spin(addr0 + i * ctypes.sizeof(cty), cty, lambda v: v == expected, str(expected), timeout, expected)
        else:
            spin(addr0 + i * ctypes.sizeof(cty), cty, lambda v: v >= expected, f">= {expected}", timeout, expected)
    return _scalar(0, tl.int32)  # the token's value means nothing; its use orders later loads


def wait_flagged(ptrs, flag):
    """Spin until every 64-bit word at ``ptrs`` carries ``flag`` in its high 32 bits; return the low 32 bits."""
    ty = ptrs.dtype.element_ty if ptrs.dtype.is_ptr() else None
    if ty not in (tl.int64, tl.uint64):
        raise TypeError(f"wait_flagged expects int64 pointers, got {ptrs!r}")
    want = _int(flag) & 0xFFFFFFFF
    timeout = current_world().config.wait_timeout_s
    for addr in np.asarray(ptrs.handle.data, dtype=np.uint64).reshape(-1):
        spin(int(addr), ctypes.c_uint64, lambda v: (v >> 32) == want, f"flag {want} in the high word", timeout,
             want, shown=lambda v: v >> 32)
    return tl.load(ptrs, volatile=True).to(tl.int32)


def consume_token(x, token):
    """Return ``x`` unchanged: the interpreter runs a program's statements in order."""
    return x


def notify(ptr, peer, signal=1, sig_op="set", comm_scope="intra_node", semantic="release"):
    """Set or add to the signal ``ptr`` on rank ``peer``."""
    sig_op, comm_scope = _c(sig_op), _c(comm_scope)
    _check_scope(comm_scope)
    if _c(semantic) not in ("release", "relaxed"):
        raise ValueError(f"notify: semantic must be 'release' or 'relaxed', got {_c(semantic)!r}")
    if ptr.type.is_block():
        raise TypeError("dl.notify takes a scalar signal pointer")
    if comm_scope == "inter_node":  # as on the GPU, so a kernel that passes here does not fail there
        raise ValueError("dl.notify: inter_node signals go through NVSHMEM; use libshmem_device.signal_op")
    _word_type(ptr)
    remote = symm_at(ptr, peer)
    if sig_op == "set":
        tl.atomic_xchg(remote, signal)
    elif sig_op == "add":
        tl.atomic_add(remote, signal)
    else:
        raise ValueError(f"sig_op must be 'set' or 'add', got {sig_op!r}")


def ld(ptr, scope="gpu", semantic="acquire"):
    """Load a 32/64-bit word (scope and semantic are checked, then have no effect here)."""
    _check_scope(scope)
    if _c(semantic) not in ("relaxed", "acquire", "volatile"):
        raise ValueError(f"load semantic must be relaxed, acquire or volatile, got {_c(semantic)!r}")
    _word_type(ptr)
    return tl.load(ptr, volatile=True)


def st(ptr, value, scope="gpu", semantic="release"):
    """Store a 32/64-bit word."""
    _check_scope(scope)
    if _c(semantic) not in ("relaxed", "release", "volatile"):
        raise ValueError(f"store semantic must be relaxed, release or volatile, got {_c(semantic)!r}")
    ty = _word_type(ptr)
    tl.atomic_xchg(ptr, tl.cast(value, ty))


def atomic_add(ptr, value, scope="gpu", semantic="relaxed"):
    _check_scope(scope)
    return tl.atomic_add(ptr, value)


def atomic_cas(ptr, cmp, value, scope="gpu", semantic="relaxed"):
    _check_scope(scope)
    return tl.atomic_cas(ptr, cmp, value)


def atomic_xchg(ptr, value, scope="gpu", semantic="relaxed"):
    _check_scope(scope)
    return tl.atomic_xchg(ptr, value)


def fence(scope="gpu", semantic="acq_rel"):
    _check_scope(scope)


def membar(scope="gpu"):
    _check_scope(scope)


def tid(axis=0):
    return _scalar(0, tl.int32)


def smid():
    return _scalar(0, tl.int32)


def wait_timeout_ns():
    """The hang watchdog's wait timeout in ns (int64; ``TRITON_DIST_WAIT_TIMEOUT_S``)."""
    return _scalar(int(current_world().config.wait_timeout_s * 1e9), tl.int64)


def globaltimer():
    return _scalar(time.monotonic_ns(), tl.int64)


def check_agree(mine, theirs, peer, code):
    """Raise :class:`CallMismatch` if ``mine`` differs from ``theirs`` (elementwise); returns ``mine``."""
    a = np.asarray(mine.handle.data if isinstance(mine, tl.tensor) else _c(mine)).astype(np.int64).reshape(-1)
    b = np.asarray(theirs.handle.data if isinstance(theirs, tl.tensor) else _c(theirs)).astype(np.int64).reshape(-1)
    p = np.broadcast_to(np.asarray(peer.handle.data if isinstance(peer, tl.tensor) else _c(peer)).reshape(-1),
                        np.broadcast(a, b).shape)
    a, b = np.broadcast_arrays(a, b)
    bad = np.nonzero(a != b)[0]
    if bad.size:
        i = int(bad[0])
        w = current_world()
        err = CallMismatch(describe_mismatch(w.rank, _int(code), int(a[i]), int(b[i]), int(p[i])))
        w.report_mismatch(str(err))
        raise err
    return mine

