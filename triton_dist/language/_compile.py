"""Compile-side glue that lets stock Triton link triton-dist's device module (and NVSHMEM's) into kernels.

``install()`` (run by ``triton_dist.init()`` on GPUs) wraps Triton's ``llir`` stage through
``knobs.runtime.add_stages_inspection_hook``: the stage links ``triton_dist_device.ll`` and, when the
kernel calls NVSHMEM, ``libnvshmem_device.bc``, without any ``extern_libs=`` at the launch site. It also points
Triton's cache at a directory named after a hash of the device API sources, so a new triton-dist version never
reuses a stale binary. A hook that was installed before ours is chained, never replaced.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

from triton import knobs

from . import _ptx

_previous_hook = None
_installed = False


def api_hash() -> str:
    """Hash of the GPU device API sources: part of the Triton cache directory."""
    h = hashlib.sha256()
    lang = os.path.dirname(_ptx.__file__)
    for name in sorted(os.listdir(lang)):
        if name.endswith((".py", ".ll")):
            with open(os.path.join(lang, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def nvshmem_device_lib() -> str | None:
    """Path of ``libnvshmem_device.bc`` (``NVSHMEM_LIB_DIR``, else the nvidia-nvshmem wheel), or None."""
    roots = [os.environ.get("NVSHMEM_LIB_DIR", "")]
    try:
        import nvidia.nvshmem as nv  # the nvidia-nvshmem-cu12/13 wheels
        roots += [os.path.join(p, "lib") for p in nv.__path__]
    except ImportError:
        pass
    for root in roots:
        if root:
            hits = glob.glob(os.path.join(root, "libnvshmem_device.bc"))
            if hits:
                return hits[0]
    return None


def _stages_hook(backend, stages, options, language, capability):
    if _previous_hook is not None:
        _previous_hook(backend, stages, options, language, capability)
    make_llir = stages.get("llir")
    if make_llir is None:
        return

    def llir_with_triton_dist(src, metadata):
        text = str(src)
        libs = dict(options.extern_libs or ())
        if _ptx.LIB_NAME in text or "__triton_dist_" in text:
            libs[_ptx.LIB_NAME] = _ptx.LIB_PATH
        if "nvshmem" in text and "libnvshmem_device" not in libs:
            path = nvshmem_device_lib()
            if path is None:
                raise RuntimeError("kernel calls libshmem_device but libnvshmem_device.bc was not found; "
                                   "install nvidia-nvshmem-cu13 or set NVSHMEM_LIB_DIR")
            libs["libnvshmem_device"] = path
        opts = dataclasses.replace(options, extern_libs=tuple(libs.items()))
        return backend.make_llir(src, metadata, opts, capability)

    stages["llir"] = llir_with_triton_dist


def install() -> None:
    """Install the stage hook once per process (idempotent)."""
    global _previous_hook, _installed
    if _installed:
        return
    _previous_hook = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = _stages_hook
    base = knobs.cache.dir
    tag = f"triton_dist_{api_hash()}"
    if os.path.basename(base) != tag:
        knobs.cache.dir = os.path.join(base, tag)
    _installed = True
