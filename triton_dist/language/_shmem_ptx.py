"""GPU bodies of ``libshmem_device``: extern calls to NVSHMEM's device symbols (``nvshmem_putmem``, ...).

Which library defines them is chosen per process by ``_compile.install(shmem=...)``: on the ``nvshmem`` backend
NVSHMEM's ``libnvshmem_device.bc``; on the ``cuda`` backend (intra-node peers over CUDA IPC, including ranks that
share a GPU) triton-dist's own ``triton_dist_shmem.ll``, with the same signatures and semantics. The kernel source
is the same either way.

Pointers travel as int64 addresses (what the C functions take as ``void*``); functions returning ``void`` are
declared as returning int32, whose value is never used. Constant ``sig_op`` and ``cmp`` arguments are checked at
compile time.
"""
import triton
from triton.language import core

from . import _ptx
from ._shmem_names import ALL, BARRIERS, GETMEM, PUTMEM, PUTMEM_SIGNAL, PER_THREAD, PER_WARP, nvshmem_symbol

_SIGNAL_SET, _SIGNAL_ADD = 9, 10  # NVSHMEM_SIGNAL_SET / NVSHMEM_SIGNAL_ADD
_CMP_RANGE = range(6)  # NVSHMEM_CMP_EQ .. NVSHMEM_CMP_GE

LIB = "libnvshmem_device"
i32, i64, u64 = core.int32, core.int64, core.uint64

__all__ = list(ALL)


def _const_int(x):
    """The Python int of a compile-time constant argument, else None (a run-time value is the library's to handle:
    triton_dist_shmem.ll traps on an invalid one)."""
    x = core._unwrap_if_constexpr(x)
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _check_sig_op(sig_op):
    op = _const_int(sig_op)
    if op is not None and op not in (_SIGNAL_SET, _SIGNAL_ADD):
        raise ValueError(f"sig_op must be NVSHMEM_SIGNAL_SET ({_SIGNAL_SET}) or NVSHMEM_SIGNAL_ADD ({_SIGNAL_ADD}), "
                         f"got {op}")


def _check_cmp(cmp):
    c = _const_int(cmp)
    if c is not None and c not in _CMP_RANGE:
        raise ValueError(f"cmp must be one of NVSHMEM_CMP_EQ..GE (0..5), got {c}")


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
        _check_sig_op(sig_op)
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


def _register(name, raw):
    """Public name -> builtin; thread/warp-level functions get a guarded @triton.jit wrapper (below)."""
    globals()[("_raw_" if name in PER_THREAD + PER_WARP else "") + name] = raw


for _n in PUTMEM + GETMEM:
    _register(_n, _rma(_n))
for _n in PUTMEM_SIGNAL:
    _register(_n, _put_signal(_n))
for _n in BARRIERS + ("fence", "quiet"):
    _register(_n, _no_arg(_n))


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
def _raw_signal_op(sig_addr, signal, sig_op, pe, _semantic=None):
    """``nvshmemx_signal_op``: set or add ``signal`` to the uint64 signal ``sig_addr`` on ``pe``."""
    _check_sig_op(sig_op)
    return _call("signal_op", [sig_addr, signal, sig_op, pe], [i64, u64, i32, i32], i32, _semantic)


@core.extern
def signal_wait_until(sig_addr, cmp, cmp_value, _semantic=None):
    """``nvshmem_signal_wait_until``: spin until ``*sig_addr <cmp> cmp_value``; returns the signal's value."""
    _check_cmp(cmp)
    return _call("signal_wait_until", [sig_addr, cmp, cmp_value], [i64, i32, u64], u64, _semantic)


# --------------------------------------------------------------------------------------------------------------
# Thread- and warp-level NVSHMEM functions, run by one thread (or warp 0) of the program. Every thread first meets
# at a barrier, so data the program wrote is complete before the put; and again after, so no thread runs ahead of
# a barrier_all/sync_all or of a put whose source it may overwrite.
@triton.jit
def _lane_ok(WARP: core.constexpr):
    if WARP:
        return _ptx.tid(0) < 32
    else:
        return _ptx.tid(0) == 0


# Each public thread/warp-level name: barrier, the NVSHMEM call on thread 0 (or warp 0), barrier.
@triton.jit
def putmem(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_putmem(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def putmem_nbi(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_putmem_nbi(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def putmem_warp(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_putmem_warp(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def putmem_nbi_warp(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_putmem_nbi_warp(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def getmem(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_getmem(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def getmem_nbi(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_getmem_nbi(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def getmem_warp(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_getmem_warp(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def getmem_nbi_warp(dest, source, nbytes, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_getmem_nbi_warp(dest, source, nbytes, pe)
    core.debug_barrier()


@triton.jit
def putmem_signal(dest, source, nbytes, sig_addr, signal, sig_op, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_putmem_signal(dest, source, nbytes, sig_addr, signal, sig_op, pe)
    core.debug_barrier()


@triton.jit
def putmem_signal_nbi(dest, source, nbytes, sig_addr, signal, sig_op, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_putmem_signal_nbi(dest, source, nbytes, sig_addr, signal, sig_op, pe)
    core.debug_barrier()


@triton.jit
def putmem_signal_warp(dest, source, nbytes, sig_addr, signal, sig_op, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_putmem_signal_warp(dest, source, nbytes, sig_addr, signal, sig_op, pe)
    core.debug_barrier()


@triton.jit
def putmem_signal_nbi_warp(dest, source, nbytes, sig_addr, signal, sig_op, pe):
    core.debug_barrier()
    if _lane_ok(True):
        _raw_putmem_signal_nbi_warp(dest, source, nbytes, sig_addr, signal, sig_op, pe)
    core.debug_barrier()


@triton.jit
def signal_op(sig_addr, signal, sig_op, pe):
    core.debug_barrier()
    if _lane_ok(False):
        _raw_signal_op(sig_addr, signal, sig_op, pe)
    core.debug_barrier()


@triton.jit
def barrier_all():
    core.debug_barrier()
    if _lane_ok(False):
        _raw_barrier_all()
    core.debug_barrier()


@triton.jit
def sync_all():
    core.debug_barrier()
    if _lane_ok(False):
        _raw_sync_all()
    core.debug_barrier()


@triton.jit
def barrier_all_warp():
    core.debug_barrier()
    if _lane_ok(True):
        _raw_barrier_all_warp()
    core.debug_barrier()


@triton.jit
def sync_all_warp():
    core.debug_barrier()
    if _lane_ok(True):
        _raw_sync_all_warp()
    core.debug_barrier()
