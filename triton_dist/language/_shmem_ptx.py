"""GPU bodies of ``libshmem_device``: extern calls into NVSHMEM's ``libnvshmem_device.bc``.

Pointers travel as int64 addresses (what the C functions take as ``void*``); functions returning ``void`` are
declared as returning int32, whose value is never used.
"""
from triton.language import core

from ._shmem_names import ALL, BARRIERS, GETMEM, PUTMEM, PUTMEM_SIGNAL, nvshmem_symbol

LIB = "libnvshmem_device"
i32, i64, u64 = core.int32, core.int64, core.uint64

__all__ = list(ALL)


def _call(name, args, types, ret, _semantic, pure=False):
    conv = [_semantic.to_tensor(a) for a in args]
    conv = [a.to(t, _semantic=_semantic) for a, t in zip(conv, types)]
    return core.extern_elementwise(LIB, "", conv, {tuple(types): (nvshmem_symbol(name), ret)}, is_pure=pure,
                                   _semantic=_semantic)


def _rma(name):
    def fn(dest, source, nbytes, pe, _semantic=None):
        return _call(name, [dest, source, nbytes, pe], [i64, i64, i64, i32], i32, _semantic)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``{nvshmem_symbol(name)}(dest, source, nbytes, pe)``: byte copy between this PE and ``pe``."
    return core.extern(fn)


def _put_signal(name):
    def fn(dest, source, nbytes, sig_addr, signal, sig_op, pe, _semantic=None):
        return _call(name, [dest, source, nbytes, sig_addr, signal, sig_op, pe], [i64, i64, i64, i64, u64, i32, i32],
                     i32, _semantic)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (f"``{nvshmem_symbol(name)}(dest, source, nbytes, sig_addr, signal, sig_op, pe)``: put, then "
                  "update the uint64 signal on ``pe`` (NVSHMEM_SIGNAL_SET or NVSHMEM_SIGNAL_ADD).")
    return core.extern(fn)


def _no_arg(name):
    def fn(_semantic=None):
        return _call(name, [], [], i32, _semantic)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``{nvshmem_symbol(name)}()``."
    return core.extern(fn)


for _n in PUTMEM + GETMEM:
    globals()[_n] = _rma(_n)
for _n in PUTMEM_SIGNAL:
    globals()[_n] = _put_signal(_n)
for _n in BARRIERS + ("fence", "quiet"):
    globals()[_n] = _no_arg(_n)


@core.extern
def my_pe(_semantic=None):
    """This PE's index (``nvshmem_my_pe``)."""
    return _call("my_pe", [], [], i32, _semantic, pure=True)


@core.extern
def n_pes(_semantic=None):
    """Number of PEs (``nvshmem_n_pes``)."""
    return _call("n_pes", [], [], i32, _semantic, pure=True)


@core.extern
def remote_ptr(ptr, pe, _semantic=None):
    """``nvshmem_ptr``: ``ptr`` on ``pe`` as a load/store address (0 if ``pe`` is not reachable by load/store)."""
    addr = _call("remote_ptr", [ptr, pe], [i64, i32], i64, _semantic, pure=True)
    return addr.to(ptr.dtype, _semantic=_semantic)


@core.extern
def signal_op(sig_addr, signal, sig_op, pe, _semantic=None):
    """``nvshmemx_signal_op``: set or add ``signal`` to the uint64 signal ``sig_addr`` on ``pe``."""
    return _call("signal_op", [sig_addr, signal, sig_op, pe], [i64, u64, i32, i32], i32, _semantic)


@core.extern
def signal_wait_until(sig_addr, cmp, cmp_value, _semantic=None):
    """``nvshmem_signal_wait_until``: spin until ``*sig_addr <cmp> cmp_value``; returns the signal's value."""
    return _call("signal_wait_until", [sig_addr, cmp, cmp_value], [i64, i32, u64], u64, _semantic)
