"""Device API of triton-dist, used inside ``@triton.jit`` kernels: ``import triton_dist.language as dl``.

=====================================  =================================================================
``dl.rank()``, ``dl.num_ranks()``      this rank and the world size (int32), no kernel argument needed
``dl.symm_at(ptr, peer)``              address of the symmetric object ``ptr`` on rank ``peer``
``dl.wait(ptr, n, scope, semantic,     spin until ``n`` consecutive signals equal ``wait_value``;
wait_value=1)``                        returns a token
``dl.consume_token(x, token)``         ``x`` made dependent on the wait (loads through it stay after it)
``dl.wait_flagged(ptrs, flag)``        low-latency receive: spin until each 64-bit word carries ``flag`` in
                                       its high half, return the low halves (flags packed with data)
``dl.notify(ptr, peer, signal, sig_op,  set/add a signal on ``peer`` with release semantics
comm_scope)``
``dl.ld / dl.st``                      32/64-bit loads and stores with scope and semantic
``dl.atomic_add / atomic_cas /          atomics with scope and semantic
atomic_xchg``
``dl.fence / dl.membar``               memory fences
``dl.tid(axis)``, ``dl.smid()``,        thread index, SM id, nanosecond timer
``dl.globaltimer()``
``dl.wait_timeout_ns()``               the hang watchdog's wait timeout (``TRITON_DIST_WAIT_TIMEOUT_S``, int64
                                       ns): for slow paths that check other signals before they give up
``dl.check_agree(mine, theirs, peer,    stop the call with :class:`~triton_dist.CallMismatch` if ranks disagree
code)``                                (the ops' agreement checks)
=====================================  =================================================================

Scopes: ``"cta"``, ``"gpu"``, ``"sys"`` (``"intra_node"``/``"inter_node"`` mean ``"sys"``). The GPU bodies are
PTX (``_ptx.py``); under ``TRITON_INTERPRET=1`` the CPU world's bodies (``_interp.py``) run instead, where a
program acts as one thread: ``tid`` is 0 and scopes and fences have no effect. ``docs/primitives.md`` has the
semantics and worked examples. The NVSHMEM-style API is :mod:`triton_dist.language.libshmem_device`.
"""
from triton import knobs as _knobs

if _knobs.runtime.interpret:
    from ._interp import (atomic_add, atomic_cas, atomic_xchg, check_agree, consume_token, fence, globaltimer, ld,
                          membar, notify, num_ranks, rank, smid, st, symm_at, tid, wait, wait_flagged,
                          wait_timeout_ns)
else:
    from ._ptx import (atomic_add, atomic_cas, atomic_xchg, check_agree, consume_token, fence, globaltimer, ld,
                       membar, notify, num_ranks, rank, smid, st, symm_at, tid, wait, wait_flagged,
                       wait_timeout_ns)

__all__ = ["rank", "num_ranks", "symm_at", "wait", "consume_token", "notify", "ld", "st", "atomic_add",
           "atomic_cas", "atomic_xchg", "fence", "membar", "tid", "smid", "globaltimer", "wait_flagged",
           "check_agree", "wait_timeout_ns"]
