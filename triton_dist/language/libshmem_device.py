"""NVSHMEM-style device API: ``from triton_dist.language import libshmem_device``.

The names are NVSHMEM's device functions, and one kernel source works on every backend. On the GPU they are extern
calls to NVSHMEM's device symbols, linked automatically (``_compile.install``, run by ``triton_dist.init()``):

* ``backend="nvshmem"``: NVSHMEM's own ``libnvshmem_device.bc``, over NVSHMEM's heap;
* ``backend="cuda"``: ``triton_dist_shmem.ll``, triton-dist's implementation of the same symbols over the intra-node
  symmetric heap (peers mapped through CUDA IPC, including ranks that share one GPU): loads, stores and system-scope
  atomics on translated addresses, waits with the ``dl.wait`` timeout.

In the CPU world they are interpreter implementations over the shared-memory heaps, with the same results.
Constant ``sig_op`` (``NVSHMEM_SIGNAL_SET``/``ADD``) and ``cmp`` (``NVSHMEM_CMP_*``) arguments are checked when the
kernel compiles.

=============================================  ========================================================
``my_pe()``, ``n_pes()``                        this PE (rank) and the number of PEs
``remote_ptr(ptr, pe)``                         ``ptr`` translated to ``pe`` (``nvshmem_ptr``)
``putmem[_nbi][_block|_warp](dst, src, nbytes, pe)``  copy local ``src`` to ``dst`` on ``pe``
``getmem[_nbi][_block|_warp](dst, src, nbytes, pe)``  copy ``src`` on ``pe`` to local ``dst``
``putmem_signal[_nbi][_block|_warp](dst, src,  put, then set/add the uint64 signal ``sig`` on ``pe``
nbytes, sig, signal, sig_op, pe)``
``signal_op(sig, signal, sig_op, pe)``         set/add a uint64 signal on ``pe``
``signal_wait_until(sig, cmp, value)``         spin until ``*sig <cmp> value``; returns the value seen
``fence()``, ``quiet()``                        order / complete outstanding puts
``barrier_all[_block]()``, ``sync_all[_block]()``  barrier over all PEs
=============================================  ========================================================

``_block`` variants run on every thread of the program (in Triton, any call does); the plain (thread-level) ones run
on one thread of the program and the ``_warp`` ones on its first warp, between two barriers of the program, so the
program's earlier writes are complete before them: prefer ``_block`` for large copies. As in NVSHMEM, one program per
PE at a time should be in a ``barrier_all``/``sync_all``.
"""
from triton import knobs as _knobs

NVSHMEM_CMP_EQ = 0
NVSHMEM_CMP_NE = 1
NVSHMEM_CMP_GT = 2
NVSHMEM_CMP_LE = 3
NVSHMEM_CMP_LT = 4
NVSHMEM_CMP_GE = 5
NVSHMEM_SIGNAL_SET = 9
NVSHMEM_SIGNAL_ADD = 10

if _knobs.runtime.interpret:
    from ._shmem_interp import *  # noqa: F401,F403
    from ._shmem_interp import __all__ as _names
else:
    from ._shmem_ptx import *  # noqa: F401,F403
    from ._shmem_ptx import __all__ as _names

__all__ = list(_names) + ["NVSHMEM_CMP_EQ", "NVSHMEM_CMP_NE", "NVSHMEM_CMP_GT", "NVSHMEM_CMP_LE",
                          "NVSHMEM_CMP_LT", "NVSHMEM_CMP_GE", "NVSHMEM_SIGNAL_SET", "NVSHMEM_SIGNAL_ADD"]
