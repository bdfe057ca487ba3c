"""The few CUDA driver calls triton-dist needs, through ctypes (no extra dependency)."""
from __future__ import annotations

import ctypes

_lib = None


def _driver():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL("libcuda.so.1")
        _lib.cuModuleGetGlobal_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                              ctypes.c_void_p, ctypes.c_char_p]
        _lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        _lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        _lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        _lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcMemHandle), ctypes.c_uint64]
        _lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcMemHandle, ctypes.c_uint]
        _lib.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        _lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return _lib


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # raw bytes: a c_char array would stop at the first NUL


def _check(err: int, what: str) -> None:
    if err != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(err, ctypes.byref(name))
        raise RuntimeError(f"{what} failed with CUDA error {err} ({(name.value or b'?').decode()})")


CUDA_ERROR_NOT_FOUND = 500


def module_global(module: int, name: str) -> tuple[int, int] | None:
    """(device address, bytes) of global ``name`` in the loaded CUmodule, or None if absent."""
    ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
    err = _driver().cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), ctypes.c_void_p(module),
                                         name.encode())
    if err == CUDA_ERROR_NOT_FOUND:
        return None
    if err != 0:
        raise RuntimeError(f"cuModuleGetGlobal({name}) failed with CUDA error {err}")
    return ptr.value, size.value


def copy_to_device(dst: int, data: bytes) -> None:
    _check(_driver().cuMemcpyHtoD_v2(dst, data, len(data)), "cuMemcpyHtoD")


def mem_alloc(nbytes: int) -> int:
    """``cuMemAlloc`` in the current context: a device address (at least 256-byte aligned)."""
    ptr = ctypes.c_uint64()
    _check(_driver().cuMemAlloc_v2(ctypes.byref(ptr), nbytes), f"cuMemAlloc({nbytes} bytes)")
    return ptr.value


def mem_free(ptr: int) -> None:
    _check(_driver().cuMemFree_v2(ptr), "cuMemFree")


def ipc_get_mem_handle(ptr: int) -> bytes:
    """The 64-byte CUDA IPC handle of the allocation that starts at ``ptr``."""
    h = _IpcMemHandle()
    _check(_driver().cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
    return bytes(h)


def ipc_open_mem_handle(handle: bytes) -> int:
    """Map another process's allocation from its IPC handle; the address in this process."""
    if len(handle) != ctypes.sizeof(_IpcMemHandle):
        raise ValueError(f"a CUDA IPC handle has {ctypes.sizeof(_IpcMemHandle)} bytes, got {len(handle)}")
    h = _IpcMemHandle.from_buffer_copy(handle)
    ptr = ctypes.c_uint64()
    lazy_peer_access = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
    _check(_driver().cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, lazy_peer_access), "cuIpcOpenMemHandle")
    return ptr.value


def ipc_close_mem_handle(ptr: int) -> None:
    _check(_driver().cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")
