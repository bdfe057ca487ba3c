"""Per-module device state on the GPU, and the hang watchdog.

Kernels that use ``triton_dist.language`` link a global ``__triton_dist_state`` (rank, world size, heap bases,
watchdog record, wait timeout). Whenever Triton loads a kernel module, ``knobs.runtime.kernel_load_end_hook``
(a hook chain: PyTorch's and others' hooks keep working) calls :func:`_on_load`, which writes this process's
state into the module, and runs ``nvshmemx_cumodule_init`` on modules that call NVSHMEM.

The watchdog record lives in pinned host memory that kernels can write. A device wait that times out fills
it (rank, signal address, expected, seen, SM, program and programs of the launch) and traps; a daemon thread prints
the record as soon as it appears, and :func:`check` raises :class:`SignalTimeout` with the same text. A failed
agreement check (``dl.check_agree``) fills it the same way and raises :class:`CallMismatch`.
"""
from __future__ import annotations

import struct
import sys
import threading
import weakref

import torch
from triton import knobs

from . import _cuda_driver
from .errors import CallMismatch, SignalTimeout, describe_mismatch

MAX_RANKS = 64
STATE_WORDS = 4 + MAX_RANKS
STATE_NAME = "__triton_dist_state"

_world = None
_record: torch.Tensor | None = None  # int64[8], pinned
_modules: dict[int, int] = {}  # CUmodule handle -> state address
_reported = False
_stop = threading.Event()


def _state_bytes() -> bytes:
    w = _world
    bases = list(w.heap.bases) + [0] * (MAX_RANKS - w.world_size)
    timeout_ns = int(w.config.wait_timeout_s * 1e9)
    return struct.pack(f"<{STATE_WORDS}q", w.rank, w.world_size, _record.data_ptr(), timeout_ns, *bases)


def _on_load(module, function, name, metadata_group, hash):
    if _world is None:
        return
    found = _cuda_driver.module_global(module, STATE_NAME)
    if found is not None:
        addr, size = found
        assert size == STATE_WORDS * 8, f"{STATE_NAME} has {size} bytes, expected {STATE_WORDS * 8}"
        _cuda_driver.copy_to_device(addr, _state_bytes())
        _modules[module] = addr
    if _cuda_driver.module_global(module, "nvshmemi_device_state_d") is not None:
        from torch._C._distributed_c10d import _nvshmemx_cumodule_init
        _nvshmemx_cumodule_init(module)


def describe(rec) -> str:
    """The watchdog record ``[flag, rank, signal address, expected, seen, SM, program, programs]`` as a message."""
    rank, addr, expected, seen, sm, pid, nprog = (int(v) for v in rec[1:8])
    program = f" (program {pid} of {nprog}, SM {sm})"
    if _world is None:
        text = f"rank {rank} waited on the signal at 0x{addr:x} for value {expected}, last saw {seen}{program}"
    else:
        text = _world.heap.timeout_message(rank, f"{_world.config.wait_timeout_s:g}", addr, expected, expected,
                                           seen, program)
    return (f"triton_dist watchdog: {text} The kernel was stopped (under MPS every rank on this GPU fails with "
            "it).")


def _error(rec) -> Exception | None:
    """The exception a filled record stands for: 2 = a wait timed out, 3 = an agreement check failed."""
    flag = int(rec[0])
    if flag == 2:
        return SignalTimeout(describe(rec))
    if flag == 3:
        rank, code, mine, theirs, peer = (int(v) for v in rec[1:6])
        return CallMismatch(describe_mismatch(rank, code, mine, theirs, peer) +
                            f" (program {int(rec[6])} of {int(rec[7])}; the kernel was stopped)")
    return None


def _raised(rec) -> Exception | None:
    """:func:`_error`, told to the peers: a mismatch is reported to them (``World.report_mismatch``) and a timeout
    becomes a ``CallMismatch`` when a peer reported one while this rank waited (``World.timeout_error``)."""
    err = _error(rec)
    if err is None or _world is None:
        return err
    if isinstance(err, CallMismatch):
        _world.report_mismatch(str(err))
        return err
    return _world.timeout_error(str(err), _world.config.wait_timeout_s, wait_s=1.0)


def recorded() -> bool:
    """True when a kernel of this process filled the watchdog record (a timed-out wait or a failed check)."""
    return _record is not None and int(_record[0]) in (2, 3)


def recorded_error() -> Exception | None:
    """The record's exception (reported to the peers as :func:`check` does), or None."""
    return _raised(_record.tolist()) if _record is not None else None


def check() -> None:
    """Raise :class:`SignalTimeout` if a device wait of this process timed out (:class:`CallMismatch` if a device-side
    agreement check failed, or if the wait was for a call that a peer stopped with one)."""
    err = _raised(_record.tolist()) if _record is not None else None
    if err is not None:
        raise err


def check_after(err: BaseException) -> None:
    """Called with a CUDA error: raise the record's error from it if a kernel was stopped (the likely cause)."""
    found = _raised(_record.tolist()) if _record is not None else None
    if found is not None:
        raise found from err


def _watch(record_ref):
    global _reported
    while not _stop.wait(0.05):
        rec = record_ref()
        if rec is None:
            return
        err = _error(rec.tolist()) if int(rec[0]) in (2, 3) else None
        if err is not None and not _reported:
            _reported = True
            print(err if isinstance(err, SignalTimeout) else f"triton_dist watchdog: {err}", file=sys.stderr,
                  flush=True)
            return


def install(world) -> None:
    """Fill the state of every module loaded from now on (and of ones already loaded)."""
    global _world, _record
    _world = world
    if _record is None:
        _record = torch.zeros(8, dtype=torch.int64, pin_memory=True)
        _stop.clear()
        threading.Thread(target=_watch, args=(weakref.ref(_record),), daemon=True,
                         name="triton_dist-watchdog").start()
    if _on_load not in knobs.runtime.kernel_load_end_hook.calls:
        knobs.runtime.kernel_load_end_hook.add(_on_load)
    for module, addr in list(_modules.items()):
        _cuda_driver.copy_to_device(addr, _state_bytes())


def uninstall() -> None:
    global _world, _record
    _world = None
    _stop.set()
    _record = None
    if _on_load in knobs.runtime.kernel_load_end_hook.calls:
        knobs.runtime.kernel_load_end_hook.remove(_on_load)
