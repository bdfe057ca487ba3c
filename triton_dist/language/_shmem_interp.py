"""CPU-world bodies of ``libshmem_device`` over the shared-memory heaps (Triton's interpreter).

Copies are synchronous ``memmove``s, so ``_nbi``, ``fence`` and ``quiet`` need no extra work; a program acts as
one thread, so ``_block``/``_warp`` variants behave like the plain ones. ``barrier_all`` uses slots in the
reserved start of every rank's heap: each call bumps this process's epoch, writes it into its slot on every
peer and waits until every slot of its own heap has reached it.
"""
import ctypes
import operator

import numpy as np
import triton.language as tl

from ..runtime.world import current_world
from . import _interp
from ._shmem_names import ALL, BARRIERS, GETMEM, PUTMEM, PUTMEM_SIGNAL

__all__ = list(ALL)

_CMP = {0: operator.eq, 1: operator.ne, 2: operator.gt, 3: operator.le, 4: operator.lt, 5: operator.ge}
_SET, _ADD = 9, 10
_epoch = {"n": 0, "world": None}


def _addr(p) -> int:
    return _interp._int(p)


def _translate(addr: int, pe: int) -> int:
    heap = current_world().heap
    me = heap.bases[heap.rank]
    if not me <= addr < me + heap.nbytes:
        raise ValueError(f"libshmem_device: address 0x{addr:x} is not on this PE's symmetric heap")
    if not 0 <= pe < heap.world_size:
        raise ValueError(f"libshmem_device: pe {pe} outside [0, {heap.world_size})")
    return heap.bases[pe] + (addr - me)


def _put(dest, source, nbytes, pe):
    n = _interp._int(nbytes)
    ctypes.memmove(_translate(_addr(dest), _interp._int(pe)), _addr(source), n)


def _get(dest, source, nbytes, pe):
    n = _interp._int(nbytes)
    ctypes.memmove(_addr(dest), _translate(_addr(source), _interp._int(pe)), n)


def signal_op(sig_addr, signal, sig_op, pe):
    """Set (NVSHMEM_SIGNAL_SET) or add (NVSHMEM_SIGNAL_ADD) ``signal`` to the uint64 signal on ``pe``."""
    op = _interp._int(sig_op)
    remote = _interp.symm_at(sig_addr, pe)
    value = _interp._int(signal)
    if op == _SET:
        tl.atomic_xchg(remote, value)
    elif op == _ADD:
        tl.atomic_add(remote, value)
    else:
        raise ValueError(f"sig_op must be NVSHMEM_SIGNAL_SET ({_SET}) or NVSHMEM_SIGNAL_ADD ({_ADD}), got {op}")


def _put_signal(dest, source, nbytes, sig_addr, signal, sig_op, pe):
    _put(dest, source, nbytes, pe)
    signal_op(sig_addr, signal, sig_op, pe)


def _barrier():
    world = current_world()
    if _epoch["world"] is not world:
        _epoch.update(n=0, world=world)
    _epoch["n"] += 1
    epoch = _epoch["n"]
    heap = world.heap
    for pe in range(heap.world_size):
        ctypes.c_int64.from_address(heap.bases[pe] + 8 * heap.rank).value = epoch
    timeout = world.config.wait_timeout_s
    for pe in range(heap.world_size):
        cell = heap.bases[heap.rank] + 8 * pe
        _interp.spin(cell, ctypes.c_int64, lambda v: v >= epoch, f">= {epoch} (barrier_all, slot of PE {pe})", timeout)


def signal_wait_until(sig_addr, cmp, cmp_value):
    """Spin until ``*sig_addr <cmp> cmp_value`` (NVSHMEM_CMP_*); returns the value seen (uint64)."""
    c, v = _interp._int(cmp), _interp._int(cmp_value)
    if c not in _CMP:
        raise ValueError(f"cmp must be one of NVSHMEM_CMP_EQ..GE (0..5), got {c}")
    ty = sig_addr.dtype.element_ty
    cty = _interp._CTYPES.get(ty)
    if cty is None:
        raise TypeError(f"signal_wait_until: signal must be a 32/64-bit integer, got pointer to {ty}")
    seen = _interp.spin(_addr(sig_addr), cty, lambda s: _CMP[c](s, v), f"{_CMP[c].__name__} {v}",
                      current_world().config.wait_timeout_s)
    return tl.tensor(_interp.TensorHandle(np.array(seen, dtype=np.uint64), tl.uint64), tl.uint64)


def my_pe():
    return _interp.rank()


def n_pes():
    return _interp.num_ranks()


def remote_ptr(ptr, pe):
    return _interp.symm_at(ptr, pe)


def fence():
    """Copies complete in order here."""


def quiet():
    """Copies are synchronous here."""


for _n in PUTMEM:
    globals()[_n] = _put
for _n in GETMEM:
    globals()[_n] = _get
for _n in PUTMEM_SIGNAL:
    globals()[_n] = _put_signal
for _n in BARRIERS:
    globals()[_n] = _barrier
