"""GPU bodies of the device API: PTX through ``tl.inline_asm_elementwise`` and calls into the
triton-dist device module (``triton_dist_device.ll``), built as Triton builtins so that scope and
semantic strings pick the instruction at compile time. Imported by ``triton_dist.language`` when
kernels are compiled for the GPU (``TRITON_INTERPRET`` unset)."""
from __future__ import annotations

import os

from triton.language import core

LIB_NAME = "libtriton_dist_device"
LIB_PATH = os.path.join(os.path.dirname(__file__), "triton_dist_device.ll")

_SCOPES = {"cta": "cta", "gpu": "gpu", "sys": "sys", "intra_node": "sys", "inter_node": "sys", "system": "sys"}
_LD_SEMS = ("relaxed", "acquire", "volatile")
_ST_SEMS = ("relaxed", "release", "volatile")


def _c(x):
    return core._unwrap_if_constexpr(x)


def _scope(scope) -> str:
    scope = _c(scope)
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {sorted(_SCOPES)}, got {scope!r}")
    return _SCOPES[scope]


def _word(ptr) -> tuple[str, str, core.dtype]:
    """PTX width, register constraint and Triton type of the word that ``ptr`` points to."""
    if not (isinstance(ptr, core.tensor) and ptr.dtype.is_ptr()):
        raise TypeError(f"expected a pointer (scalar or block), got {ptr!r}")
    ty = ptr.dtype.element_ty
    if ty in (core.int32, core.uint32):
        return "b32", "r", ty
    if ty in (core.int64, core.uint64):
        return "b64", "l", ty
    raise TypeError(f"signals and ld/st words must be int32, uint32, int64 or uint64, got pointer to {ty}")


def _extern(name, args, types, ret, _semantic, pure=True):
    return core.extern_elementwise(LIB_NAME, LIB_PATH, args, {tuple(types): (name, ret)}, is_pure=pure,
                                   _semantic=_semantic)


def _as_i64(ptr, _semantic):
    return ptr.to(core.int64, _semantic=_semantic)


@core.extern
def rank(_semantic=None):
    """This rank's index in the world (int32)."""
    return _extern("__triton_dist_rank", [], [], core.int32, _semantic)


@core.extern
def num_ranks(_semantic=None):
    """Number of ranks in the world (int32)."""
    return _extern("__triton_dist_num_ranks", [], [], core.int32, _semantic)


HEAP_ALIGN = 256  # bytes; every heap base is page aligned, every allocation 256-byte aligned


@core.extern
def symm_at(ptr, peer, _semantic=None):
    """Address of the symmetric object ``ptr`` (local heap) on rank ``peer``; scalar or block pointers.

    Implemented as ``ptr + delta`` with a scalar element offset ``delta`` known to be a multiple of 256 bytes, so
    Triton's contiguity and alignment analysis of ``ptr`` survives and peer loads/stores stay vectorised.
    """
    if not (isinstance(ptr, core.tensor) and ptr.dtype.is_ptr()):
        raise TypeError(f"symm_at expects a pointer, got {ptr!r}")
    elem_bytes = max(1, ptr.dtype.element_ty.primitive_bitwidth // 8)
    peer = _semantic.to_tensor(peer).to(core.int32, _semantic=_semantic)
    delta = _extern("__triton_dist_peer_delta", [peer, _semantic.to_tensor(elem_bytes)], [core.int32, core.int32],
                    core.int64, _semantic)
    if not delta.type.is_block():
        delta = core.multiple_of(delta, core.constexpr(HEAP_ALIGN // elem_bytes), _semantic=_semantic)
    return _semantic.add(ptr, delta, True)


def _ld_op(scope, semantic, width) -> str:
    semantic = _c(semantic)
    if semantic not in _LD_SEMS:
        raise ValueError(f"load semantic must be one of {_LD_SEMS}, got {semantic!r}")
    if semantic == "volatile":
        return f"ld.volatile.global.{width}"
    return f"ld.{semantic}.{_scope(scope)}.global.{width}"


@core.extern
def wait(signal_ptrs, num_signals=1, scope="sys", semantic="acquire", wait_value=1, cmp="eq", _semantic=None):
    """Spin until ``num_signals`` consecutive signals from ``signal_ptrs`` each equal ``wait_value``
    (``cmp="ge"``, an extension: each is at least ``wait_value``, signed for int32/int64, for monotonic counters).

    Every thread of the program spins, so every thread's later loads are ordered after the wait.
    Returns a token for :func:`consume_token`. A wait longer than ``TRITON_DIST_WAIT_TIMEOUT_S`` records
    (rank, signal address, expected, last seen) for the host watchdog and traps.
    """
    if signal_ptrs.type.is_block():
        raise TypeError("dl.wait takes the first signal's scalar pointer and num_signals (consecutive signals), "
                        "not a block of pointers")
    width, reg, ty = _word(signal_ptrs)
    cmp = _c(cmp)
    if cmp not in ("eq", "ge"):
        raise ValueError(f"wait: cmp must be 'eq' or 'ge', got {cmp!r}")
    test = f"setp.eq.{width}" if cmp == "eq" else f"setp.ge.{('s' if ty in (core.int32, core.int64) else 'u')}{width[1:]}"
    # Acquire polls (ld.acquire) measured faster than relaxed polls plus one fence.acq_rel.sys after the loop
    # (2x H100 / 4x H100, docs/perf/NOTES.md): a sys-scope fence waits for the whole memory system.
    ld = _ld_op(scope, semantic, width)
    step = 4 if width == "b32" else 8
    n = _semantic.to_tensor(num_signals).to(core.int32, _semantic=_semantic)
    expected = _semantic.to_tensor(wait_value).to(ty, _semantic=_semantic)
    timeout = _extern("__triton_dist_wait_timeout_ns", [n], [core.int32], core.int64, _semantic)
    asm = f"""{{
    .reg .pred %p_done, %p_eq, %p_left;
    .reg .u64 %t0, %t1, %a;
    .reg .u32 %i;
    .reg .{width} %v;
    mov.u64 %t0, %globaltimer;
    mov.u64 %a, $3;
    mov.u32 %i, 0;
    mov.u32 $1, 0;
    mov.{width} %v, $4;
    NEXT:
    setp.ge.u32 %p_done, %i, $5;
    @%p_done bra DONE;
    SPIN:
    {ld} %v, [%a];
    {test} %p_eq, %v, $4;
    @%p_eq bra ADVANCE;
    mov.u64 %t1, %globaltimer;
    sub.u64 %t1, %t1, %t0;
    setp.lt.u64 %p_left, %t1, $6;
    @%p_left bra SPIN;
    mov.u32 $1, 1;
    bra DONE;
    ADVANCE:
    add.u64 %a, %a, {step};
    add.u32 %i, %i, 1;
    bra NEXT;
    DONE:
    mov.{width} $0, %v;
    mov.u64 $2, %a;
    }}"""
    seen, timed_out, addr = core.inline_asm_elementwise(
        asm, f"={reg},=r,=l,l,{reg},r,l", [_as_i64(signal_ptrs, _semantic), expected, n, timeout],
        dtype=(ty, core.int32, core.int64), is_pure=False, pack=1, _semantic=_semantic)
    checked = _extern("__triton_dist_check_wait",
                      [timed_out, addr, expected.to(core.int64, _semantic=_semantic),
                       seen.to(core.int64, _semantic=_semantic)],
                      [core.int32, core.int64, core.int64, core.int64], core.int64, _semantic, pure=False)
    return checked.to(core.int32, _semantic=_semantic)


@core.extern
def wait_flagged(ptrs, flag, _semantic=None):
    """Low-latency receive (an extension): spin until every 64-bit word at ``ptrs`` (int64 pointers, scalar or
    block) carries ``flag`` in its high 32 bits; return the low 32 bits (int32, same shape).

    The sender writes ``(flag << 32) | data`` with one 8-byte store per word (``dl.st(..., "sys", "volatile")``):
    8-byte stores are single-copy atomic, so the flag arriving means the data arrived, with no fence and no
    separate signal. Each thread polls its own words (``ld.volatile``). Timeouts are reported like :func:`wait`'s.
    """
    if not (isinstance(ptrs, core.tensor) and ptrs.dtype.is_ptr() and ptrs.dtype.element_ty in (core.int64,
                                                                                                   core.uint64)):
        raise TypeError(f"wait_flagged expects int64 pointers, got {ptrs!r}")
    flag = _semantic.to_tensor(flag).to(core.int32, _semantic=_semantic)
    one = _semantic.to_tensor(1)
    timeout = _extern("__triton_dist_wait_timeout_ns", [one], [core.int32], core.int64, _semantic)
    asm = """{
    .reg .pred %p_eq, %p_left;
    .reg .u64 %t0, %t1;
    .reg .b64 %v;
    .reg .b32 %hi;
    mov.u64 %t0, %globaltimer;
    mov.u32 $1, 0;
    SPIN:
    ld.volatile.global.b64 %v, [$3];
    mov.b64 {$0, %hi}, %v;
    setp.eq.b32 %p_eq, %hi, $4;
    @%p_eq bra DONE;
    mov.u64 %t1, %globaltimer;
    sub.u64 %t1, %t1, %t0;
    setp.lt.u64 %p_left, %t1, $5;
    @%p_left bra SPIN;
    mov.u32 $1, 1;
    DONE:
    mov.u32 $2, %hi;
    }"""
    low, timed_out, high = core.inline_asm_elementwise(
        asm, "=r,=r,=r,l,r,l", [_as_i64(ptrs, _semantic), flag, timeout],
        dtype=(core.int32, core.int32, core.int32), is_pure=False, pack=1, _semantic=_semantic)
    checked = _extern("__triton_dist_check_wait",
                      [timed_out, _as_i64(ptrs, _semantic), flag.to(core.int64, _semantic=_semantic),
                       high.to(core.int64, _semantic=_semantic)],
                      [core.int32, core.int64, core.int64, core.int64], core.int64, _semantic, pure=False)
    # keep the check alive (its result is the flag seen); the data is the low word
    return _semantic.add(low, _semantic.mul(checked.to(core.int32, _semantic=_semantic), _semantic.to_tensor(0),
                                            True), True)


@core.extern
def consume_token(x, token, _semantic=None):
    """Return ``x`` (a pointer, scalar or block) made data-dependent on ``token`` from :func:`wait`, so loads
    through the result cannot be hoisted above the wait. Apply it to a scalar base pointer and add offsets
    afterwards, so that contiguity and alignment analysis still vectorise the loads."""
    if isinstance(x, core.tensor_descriptor_base):
        return x  # descriptor loads are side-effecting ops after the (side-effecting) wait
    token = _semantic.to_tensor(token).to(core.int32, _semantic=_semantic)
    # x + dep with dep an opaque zero computed from the token: the data dependency orders the loads after the wait,
    # and dep, declared a multiple of 128 elements, keeps x's contiguity and alignment, so loads through the result
    # stay 16-byte vectorised (a round trip of x through an integer would lose them)
    dep = core.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [token], dtype=core.int32, is_pure=False, pack=1,
                                      _semantic=_semantic)
    dep = core.multiple_of(dep, core.constexpr(128), _semantic=_semantic)
    return _semantic.add(x, dep, True)


@core.extern
def check_agree(mine, theirs, peer, code, _semantic=None):
    """Stop the call if this rank's ``mine`` differs from ``theirs``, a value ``peer`` published for the same call (an
    extension, for the ops' agreement checks): the host then raises :class:`~triton_dist.CallMismatch` described by
    check ``code`` (``runtime.errors.AGREE_CHECKS``). GPU: a record for the watchdog and a trap, as a timed-out wait;
    scalars or blocks of int32/int64. Returns ``mine`` (int64)."""
    i64 = core.int64
    args = [_semantic.to_tensor(v).to(i64, _semantic=_semantic) for v in (mine, theirs)]
    args += [_semantic.to_tensor(v).to(core.int32, _semantic=_semantic) for v in (peer, code)]
    return _extern("__triton_dist_check_agree", args, [i64, i64, core.int32, core.int32], i64, _semantic, pure=False)


def _one_thread_store(ptr, value, op: str, width, reg, _semantic):
    return core.inline_asm_elementwise(f"""{{
    .reg .pred %p;
    .reg .u32 %t;
    mov.u32 %t, %tid.x;
    setp.eq.u32 %p, %t, 0;
    @%p {op} [$1], $2;
    mov.u32 $0, 0;
    }}""", f"=r,l,{reg}", [_as_i64(ptr, _semantic), value], dtype=core.int32, is_pure=False, pack=1,
        _semantic=_semantic)


@core.extern
def notify(ptr, peer, signal=1, sig_op="set", comm_scope="intra_node", semantic="release", _semantic=None):
    """Set (``sig_op="set"``) or add to (``"add"``) the signal ``ptr`` on rank ``peer`` with release semantics.

    All threads of the program first meet at a barrier, so everything the program wrote before is visible to
    a peer that waits on the signal with acquire semantics. One thread writes the signal.
    ``comm_scope``: ``"gpu"`` (same GPU), ``"intra_node"`` (NVLink peers); for ``"inter_node"`` use
    ``libshmem_device.signal_op``.

    ``semantic="relaxed"`` (an extension) writes the signal with a relaxed store after the barrier: use it after
    one ``dl.fence("sys")`` to signal several peers with a single release (the fence is what orders the data)::

        tl.debug_barrier(); dl.fence("sys")
        for peer in range(dl.num_ranks()):
            dl.notify(sig, peer, e, semantic="relaxed")
    """
    sig_op, comm_scope, semantic = _c(sig_op), _c(comm_scope), _c(semantic)
    if semantic not in ("release", "relaxed"):
        raise ValueError(f"notify: semantic must be 'release' or 'relaxed', got {semantic!r}")
    if ptr.type.is_block():
        raise TypeError("dl.notify takes a scalar signal pointer")
    if comm_scope == "inter_node":
        raise ValueError("dl.notify: inter_node signals go through NVSHMEM; use libshmem_device.signal_op")
    width, reg, ty = _word(ptr)
    scope = _scope(comm_scope)
    if sig_op == "set":
        op = f"st.{semantic}.{scope}.global.{width}"
    elif sig_op == "add":
        op = f"red.{semantic}.{scope}.global.add.{'u32' if width == 'b32' else 'u64'}"
    else:
        raise ValueError(f"sig_op must be 'set' or 'add', got {sig_op!r}")
    core.debug_barrier(_semantic=_semantic)
    remote = symm_at(ptr, peer, _semantic=_semantic)
    value = _semantic.to_tensor(signal).to(ty, _semantic=_semantic)
    _one_thread_store(remote, value, op, width, reg, _semantic)


@core.extern
def ld(ptr, scope="gpu", semantic="acquire", _semantic=None):
    """Load a 32/64-bit word with ``semantic`` in (relaxed, acquire, volatile) at ``scope`` (cta, gpu, sys)."""
    width, reg, ty = _word(ptr)
    return core.inline_asm_elementwise(f"{_ld_op(scope, semantic, width)} $0, [$1];", f"={reg},l",
                                       [_as_i64(ptr, _semantic)], dtype=ty, is_pure=False, pack=1,
                                       _semantic=_semantic)


@core.extern
def st(ptr, value, scope="gpu", semantic="release", _semantic=None):
    """Store a 32/64-bit word with ``semantic`` in (relaxed, release, volatile) at ``scope``."""
    width, reg, ty = _word(ptr)
    semantic = _c(semantic)
    if semantic not in _ST_SEMS:
        raise ValueError(f"store semantic must be one of {_ST_SEMS}, got {semantic!r}")
    op = f"st.volatile.global.{width}" if semantic == "volatile" else f"st.{semantic}.{_scope(scope)}.global.{width}"
    value = _semantic.to_tensor(value).to(ty, _semantic=_semantic)
    return core.inline_asm_elementwise(f"{op} [$1], $2; mov.u32 $0, 0;", f"=r,l,{reg}",
                                       [_as_i64(ptr, _semantic), value], dtype=core.int32, is_pure=False, pack=1,
                                       _semantic=_semantic)


@core.extern
def atomic_add(ptr, value, scope="gpu", semantic="relaxed", _semantic=None):
    """Atomic add returning the old value; ``semantic`` in (relaxed, acquire, release, acq_rel)."""
    return core.atomic_add(ptr, value, sem=_c(semantic), scope=_scope(scope), _semantic=_semantic)


@core.extern
def atomic_cas(ptr, cmp, value, scope="gpu", semantic="relaxed", _semantic=None):
    """Atomic compare-and-swap returning the old value."""
    return core.atomic_cas(ptr, cmp, value, sem=_c(semantic), scope=_scope(scope), _semantic=_semantic)


@core.extern
def atomic_xchg(ptr, value, scope="gpu", semantic="relaxed", _semantic=None):
    """Atomic exchange returning the old value."""
    return core.atomic_xchg(ptr, value, sem=_c(semantic), scope=_scope(scope), _semantic=_semantic)


def _asm_scalar(text, ty, reg, _semantic):
    return core.inline_asm_elementwise(text, f"={reg},r", [_semantic.to_tensor(0)], dtype=ty, is_pure=False,
                                       pack=1, _semantic=_semantic)


@core.extern
def fence(scope="gpu", semantic="acq_rel", _semantic=None):
    """Memory fence: ``semantic`` "acq_rel" or "sc" at ``scope`` (cta, gpu, sys)."""
    semantic = _c(semantic)
    if semantic not in ("acq_rel", "sc"):
        raise ValueError(f"fence semantic must be 'acq_rel' or 'sc', got {semantic!r}")
    _asm_scalar(f"fence.{semantic}.{_scope(scope)}; mov.u32 $0, 0;", core.int32, "r", _semantic)


@core.extern
def membar(scope="gpu", _semantic=None):
    """``membar.cta`` / ``membar.gl`` / ``membar.sys``."""
    level = {"cta": "cta", "gpu": "gl", "sys": "sys"}[_scope(scope)]
    _asm_scalar(f"membar.{level}; mov.u32 $0, 0;", core.int32, "r", _semantic)


@core.extern
def tid(axis=0, _semantic=None):
    """This thread's index in its program along ``axis`` (0, 1, 2)."""
    axis = _c(axis)
    return _asm_scalar(f"mov.u32 $0, %tid.{'xyz'[axis]};", core.int32, "r", _semantic)


@core.extern
def smid(_semantic=None):
    """Index of the SM running this program."""
    return _asm_scalar("mov.u32 $0, %smid;", core.int32, "r", _semantic)


@core.extern
def wait_timeout_ns(_semantic=None):
    """The hang watchdog's wait timeout in ns (int64; ``TRITON_DIST_WAIT_TIMEOUT_S``), from the device state."""
    return _extern("__triton_dist_wait_timeout_ns", [_semantic.to_tensor(1)], [core.int32], core.int64, _semantic)


@core.extern
def globaltimer(_semantic=None):
    """Global nanosecond timer (int64), comparable across SMs of one GPU."""
    return _asm_scalar("mov.u64 $0, %globaltimer;", core.int64, "l", _semantic)
