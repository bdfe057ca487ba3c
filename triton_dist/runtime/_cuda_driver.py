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
    return _lib


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
    err = _driver().cuMemcpyHtoD_v2(dst, data, len(data))
    if err != 0:
        raise RuntimeError(f"cuMemcpyHtoD failed with CUDA error {err}")
