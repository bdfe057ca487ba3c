"""Compile-side glue that lets stock Triton link triton-dist's device module (and an NVSHMEM library) into kernels.

``install(shmem=...)`` (run by ``triton_dist.init()`` on GPUs) wraps Triton's ``llir`` stage through
``knobs.runtime.add_stages_inspection_hook``: the stage links ``triton_dist_device.ll`` and, when the kernel calls
``libshmem_device`` (NVSHMEM's device names), the libshmem implementation chosen for this process, without any
``extern_libs=`` at the launch site:

* ``"nvshmem"``: NVSHMEM's own ``libnvshmem_device.bc`` (the ``nvshmem`` backend, whose heap NVSHMEM owns);
* ``"triton_dist"``: ``triton_dist_shmem.ll``, triton-dist's implementation of the same symbols over the
  intra-node heaps of the ``cuda`` backend (CUDA IPC, ranks possibly sharing a GPU).

It also points Triton's cache at a directory named after a hash of the device API sources and the flavour, so a new
triton-dist version never reuses a stale binary and a kernel linked against one flavour is never loaded for the
other. A hook that was installed before ours is chained, never replaced.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

from triton import knobs

from . import _ptx

SHMEM_NVSHMEM = "nvshmem"
SHMEM_TRITON_DIST = "triton_dist"
SHMEM_FLAVOURS = (SHMEM_NVSHMEM, SHMEM_TRITON_DIST)
"""libshmem implementations: NVSHMEM's ``libnvshmem_device.bc``, or our ``triton_dist_shmem.ll``."""

NVSHMEM_LIB_NAME = "libnvshmem_device"
SHMEM_LIB_NAME = "libtriton_dist_shmem"
SHMEM_LIB_PATH = os.path.join(os.path.dirname(__file__), "triton_dist_shmem.ll")

_previous_hook = None
_installed = False
_shmem = SHMEM_NVSHMEM
_cache_base: str | None = None  # Triton's cache dir before we tagged it
_cache_ours: str | None = None  # the tagged dir we set


def api_hash() -> str:
    """Hash of the GPU device API sources: part of the Triton cache directory."""
    h = hashlib.sha256()
    lang = os.path.dirname(_ptx.__file__)
    for name in sorted(os.listdir(lang)):
        if name.endswith((".py", ".ll")):
            with open(os.path.join(lang, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def shmem_flavour() -> str:
    """The libshmem implementation that kernels compiled from now on in this process link (``SHMEM_FLAVOURS``)."""
    return _shmem


def cache_tag(shmem: str, digest: str | None = None) -> str:
    """Name of the Triton cache subdirectory for this API version and libshmem flavour."""
    return f"triton_dist_{digest or api_hash()}_{shmem}"


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
    shmem = _shmem  # the flavour when the compile started

    def llir_with_triton_dist(src, metadata):
        text = str(src)
        libs = dict(options.extern_libs or ())
        device = _ptx.LIB_NAME in text or "__triton_dist_" in text
        if "nvshmem" in text:
            if shmem == SHMEM_TRITON_DIST:
                libs.pop(SHMEM_LIB_NAME, None)
                libs[SHMEM_LIB_NAME] = SHMEM_LIB_PATH
                device = True  # triton_dist_shmem.ll uses the device state and __triton_dist_check_wait
            elif NVSHMEM_LIB_NAME not in libs:
                path = nvshmem_device_lib()
                if path is None:
                    raise RuntimeError("kernel calls libshmem_device but libnvshmem_device.bc was not found; "
                                       "install nvidia-nvshmem-cu13 or set NVSHMEM_LIB_DIR")
                libs[NVSHMEM_LIB_NAME] = path
        if device:
            # last: Triton links the libraries in order, each LinkOnlyNeeded, so the device module must come after
            # every library that references its symbols
            libs.pop(_ptx.LIB_NAME, None)
            libs[_ptx.LIB_NAME] = _ptx.LIB_PATH
        opts = dataclasses.replace(options, extern_libs=tuple(libs.items()))
        return backend.make_llir(src, metadata, opts, capability)

    stages["llir"] = llir_with_triton_dist


def install(shmem: str = SHMEM_NVSHMEM) -> None:
    """Install the stage hook (once per process) and choose the libshmem implementation ``shmem`` (one of
    ``SHMEM_FLAVOURS``: ``"nvshmem"`` for the nvshmem backend, ``"triton_dist"`` for the cuda backend).

    Calling it again with another flavour switches the flavour and the cache directory for kernels compiled from
    then on; kernels already compiled in this process (Triton's in-memory caches) keep the binary they were linked
    with. Idempotent for the same flavour.
    """
    global _previous_hook, _installed, _shmem, _cache_base, _cache_ours
    if shmem not in SHMEM_FLAVOURS:
        raise ValueError(f"shmem must be one of {SHMEM_FLAVOURS}, got {shmem!r}")
    if not _installed:
        _previous_hook = knobs.runtime.add_stages_inspection_hook
        knobs.runtime.add_stages_inspection_hook = _stages_hook
        _installed = True
    _shmem = shmem
    current = knobs.cache.dir
    if _cache_ours is not None and current == _cache_ours:
        base = _cache_base  # we tagged it before: re-tag from the same base
    else:
        digest = api_hash()
        base = current
        if os.path.basename(base) in (cache_tag(f, digest) for f in SHMEM_FLAVOURS):
            base = os.path.dirname(base)  # already one of ours (e.g. TRITON_CACHE_DIR set to a tagged dir)
    ours = os.path.join(base, cache_tag(shmem))
    knobs.cache.dir = ours
    _cache_base, _cache_ours = base, ours
