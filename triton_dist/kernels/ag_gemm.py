"""AllGather + GEMM: ``C = all_gather(A) @ B``, the gather overlapped with the GEMM.

Shards: every rank holds ``a`` (``m x K``, its rows of A: rank ``r`` has rows ``r*m:(r+1)*m`` of the ``M = world*m``
row A) and its own ``b`` (``K x N``, any strides, e.g. ``w.t()`` of an ``nn.Linear`` weight). Every rank gets
``C = A @ b`` (``M x N``): the column-parallel linear layer of sequence-parallel tensor parallelism.

The context's symmetric ``gathered`` buffer (``max_m x K``) receives A: each rank writes its shard into its own rows
(chunk ``rank``) and copies the other chunks from the peers' buffers. The GEMM is one persistent kernel on the main
stream whose tiles run chunk by chunk, starting at this rank's chunk and rotating (``rank``, ``rank+1``, ...); the
tiles of a chunk wait only for that chunk's flag (one wait per program and chunk), so the GEMM runs while later
chunks arrive. At world size 1 there is nothing to gather: the GEMM reads ``a`` itself on every SM, waiting on a
chunk flag raised once for all at the context's creation (any method; ``sequential`` is ``torch.matmul``; no epoch
bump, no per-call kernel but the GEMM), and the gathered buffer is filled only for ``return_gathered``.

Signals (``signals``, int32, on the symmetric heap; ``e`` is the call's epoch, bumped on the stream; every wait is
``>=``, nothing is ever reset between calls):

* ``done[s]`` (``signals[s]``): rank ``s`` finished reading my buffer in call ``e`` (it copied my chunk). Before
  writing anything into my buffer in call ``e`` a rank waits ``done[*] >= e-1``: no peer still reads the previous
  call's chunk, whatever the row ranges of the two calls.
* ``flag[c]`` (``signals[world + c]``, local): chunk ``c`` is in my buffer for call ``e``. The GEMM's tiles of chunk
  ``c`` wait ``flag[c] >= e`` (acquire), then make the A pointer/descriptor depend on the wait.
* ``ready`` (the ``pad``, ``[program][rank]``): my shard is in my buffer, as in :mod:`._common`; with it each
  program publishes the call's signature (``_common.publish_signature``: op, method, rows and K), which the peers
  check after their ready wait, so ranks calling differently stop with ``CallMismatch``.

Methods (the comm part runs on a side stream, forked from and joined back into the current stream):

* ``copy_engine``: a 1-program kernel waits ``done[*] >= e-1``; ``copy_`` of my shard into my rows; a step kernel
  raises ``flag[rank]``, announces ``ready`` and waits for the next peer's; then per peer ``s``: ``copy_`` from
  ``s``'s buffer (CUDA IPC view: the copy engine over NVLink), then a step kernel raises ``flag[s]`` and waits for
  the next peer; the last one announces ``done``. The GEMM uses all SMs but one (the tiny kernels need one).
* ``sm``: a pull kernel of a few programs: each waits ``done[*] >= e-1``, copies its tiles of my shard into my rows,
  announces ``ready`` (program p to program p of every rank), waits for the peers' program p, pulls its tiles of
  every peer's chunk (NVLink loads; 16-byte vectors when a chunk holds a multiple of 16 elements). The last program
  to finish a chunk raises its flag (a per-chunk counter), the last to finish all chunks announces ``done``. The
  GEMM uses the remaining SMs.
* ``sequential``: the pull kernel on all SMs, then ``torch.matmul`` (for small M, where overlap cannot win).

In the CPU world streams do not exist: the comm part runs before the GEMM (the GEMM never waits for a later launch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from ._common import (REGIONS, SIG, SIGNATURE_CHECK, announce, await_all, call_signature, check_signatures,
                      copy_blocks, label_pad, label_words, publish_signature)
from .gemm import (OverlapContext, announce_done, check_method, check_operands, check_out, chunk_tiles,
                   dot_precision, fence_async_proxy, num_sms, operands, store_operand)

METHODS = ("copy_engine", "sm", "sequential")
# auto, from the 4x H100 run of 2026-11-28 (docs/perf/NOTES.md): "sm" won for M < 8192 on 5 of 6 model shapes,
# "copy_engine" at M = 8192 on 2 of 3; with N <= 2048 per rank neither beat NCCL + cuBLAS (542 / 702 vs 411 us at
# M=4096 K=8192 N=2048), so auto takes the sequential path there.
AUTO_METHOD = "sm"
COPY_ENGINE_MIN_M = 8192
# auto: up to this many rows of C with fewer than SEQUENTIAL_WIDE_N columns per rank, or up to SEQUENTIAL_MAX_N
# columns at any M, gather then torch.matmul. Measured (4x H100, run 2d40f2306694): M=1024 N=3584 K=4096: sequential
# 146 us, sm 153, NCCL + cuBLAS 144; M=1024 N=7168 K=8192: sm 285, sequential 302, NCCL + cuBLAS 299; M=4096 N=2048
# K=8192: sequential 409, sm 410, NCCL + cuBLAS 403.
SEQUENTIAL_MAX_M = 1024
SEQUENTIAL_WIDE_N = 4096
SEQUENTIAL_MAX_N = 2048
SM_COMM_PROGRAMS = 20  # programs of the pull kernel next to the GEMM (method "sm") on GPUs


@triton.jit
def _chunk_copied(sig_ptr, chunk, e, nprog):
    """Count this program's part of ``chunk`` as copied; the last of ``nprog`` programs raises ``flag[chunk]``."""
    world = dl.num_ranks()
    count = sig_ptr + 2 * world + chunk
    tl.debug_barrier()  # every thread's stores of the chunk come before the count (release)
    if dl.atomic_add(count, 1, "gpu", "acq_rel") == nprog - 1:
        dl.st(count, 0, "gpu", "relaxed")  # the next call's kernel starts after this one ends
        dl.notify(sig_ptr + world + chunk, dl.rank(), e, "set", "intra_node")


@triton.jit(do_not_specialize=["sig"])
def _ag_pull_kernel(a_ptr, gathered_ptr, sig_ptr, pad_ptr, epoch_ptr, chunk_numel, sig, BLOCK: tl.constexpr):
    """Method ``sm`` (and ``sequential``): gather A into ``gathered``, raising each chunk's flag when complete.
    Buffer tiles of BLOCK elements belong to program ``tile % nprog`` on every rank (see ``_common.tile_span``)."""
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    e = tl.load(epoch_ptr)
    gathered = dl.consume_token(gathered_ptr, dl.wait(sig_ptr, world, "sys", "acquire", e - 1, cmp="ge"))
    copy_blocks(a_ptr, gathered + rank * chunk_numel, 0, chunk_numel, nprog, BLOCK, rank * chunk_numel)
    _chunk_copied(sig_ptr, rank, e, nprog)
    publish_signature(pad_ptr, sig, rank, world)
    announce(pad_ptr, 0, e, rank, world)
    token = await_all(pad_ptr, 0, e, world)
    check_signatures(pad_ptr, sig, world, token)
    base = dl.consume_token(gathered_ptr, token)
    for i in range(1, world):
        src = (rank + i) % world
        rows = base + src * chunk_numel
        copy_blocks(dl.symm_at(rows, src), rows, 0, chunk_numel, nprog, BLOCK, src * chunk_numel)
        _chunk_copied(sig_ptr, src, e, nprog)
    announce_done(sig_ptr, sig_ptr + 3 * world, e, nprog)


@triton.jit
def _ce_begin_kernel(sig_ptr, epoch_ptr):
    """Method ``copy_engine``, before my shard goes into my buffer: every rank finished reading it (call e-1)."""
    dl.wait(sig_ptr, dl.num_ranks(), "sys", "acquire", tl.load(epoch_ptr) - 1, cmp="ge")


@triton.jit(do_not_specialize=["sig"])
def _ce_step_kernel(sig_ptr, pad_ptr, epoch_ptr, arrived, next_src, sig, PUBLISH: tl.constexpr):
    """Method ``copy_engine``, after chunk ``arrived`` was copied into my buffer: raise its flag; with ``PUBLISH``
    (``arrived`` is my own shard) tell every rank that my chunk is ready (with the call's signature ``sig``). Then
    wait until rank ``next_src``'s chunk is ready (the next copy reads it) and check its signature, or, with
    ``next_src < 0``, announce that I finished reading every peer."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr)
    sigs = pad_ptr + SIG * world  # program 0's SIG slots
    dl.notify(sig_ptr + world + arrived, rank, e, "set", "intra_node")
    if PUBLISH:
        for peer in range(world):
            tl.store(dl.symm_at(sigs + rank, peer), sig)
        for peer in range(world):
            dl.notify(pad_ptr + rank, peer, e, "set", "intra_node")  # release: after the signature stores
    if next_src >= 0:
        token = dl.wait(pad_ptr + next_src, 1, "sys", "acquire", e, cmp="ge")
        dl.check_agree(sig, tl.load(dl.consume_token(sigs, token) + next_src), next_src, SIGNATURE_CHECK)
    else:
        for peer in range(world):
            dl.notify(sig_ptr + rank, peer, e, "set", "intra_node")


@triton.jit
def _ag_gemm_kernel(a, b, c_ptr, c_desc, sig_ptr, epoch_ptr, m_loc, N, K,
                    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    TMA_STORE: tl.constexpr):
    """Persistent GEMM over the gathered A, chunk by chunk: chunk ``rank`` first, then ``rank+1``, ...; before its
    first tile of a chunk a program waits for that chunk's flag, then runs its tiles of the chunk in one flattened
    loop (:func:`~triton_dist.kernels.gemm.chunk_tiles`). ``a`` is the gathered buffer (descriptor or pointer),
    rows of chunk c at ``c*m_loc``; ``TMA_STORE``: tiles are stored through ``c_desc`` (``m_loc`` is a multiple of
    ``BLOCK_M``, so no tile crosses into the next chunk's rows), else masked pointer stores into ``c_ptr``."""
    rank = dl.rank()
    world = dl.num_ranks()
    e = tl.load(epoch_ptr)
    for i in range(world):
        src = (rank + i) % world
        token = dl.wait(sig_ptr + world + src, 1, "sys", "acquire", e, cmp="ge")
        a_src = dl.consume_token(a, token)
        if USE_TMA:
            fence_async_proxy()  # the peers' chunk was written by the generic proxy, TMA reads by the async one
        chunk_tiles(a_src, b, c_ptr, c_desc, i, src * m_loc, src * m_loc, m_loc, N, K, stride_am, stride_ak,
                    stride_bk, stride_bn, stride_cm, stride_cn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, USE_TMA, B_TRANS,
                    DOT_PRECISION, TMA_STORE)


class AGGemmContext(OverlapContext):
    """Gathered-A buffer (``max_m x k``, symmetric), signals, epoch and side stream of ``ag_gemm`` calls with up to
    ``max_m`` rows of C (``max_m / world`` per rank), inner dimension ``k`` and ``n`` columns of B, in ``dtype``.

    ``comm_programs``: programs of the pull kernel of method ``sm`` (default 20 on GPUs, 2 in the CPU world);
    ``num_programs``: the SM budget of a call (default: the GPU's SMs). Made once, reused by every call."""

    op = "ag_gemm"

    def __init__(self, max_m: int, k: int, n: int, dtype: torch.dtype, *, config=None,
                 comm_programs: int | None = None, num_programs: int | None = None):
        super().__init__(max_m, k, n, dtype, config)
        world = self.world.world_size
        self.num_programs = num_programs or num_sms(self.world)
        self.comm_programs = comm_programs or (2 if self.world.interpreted else SM_COMM_PROGRAMS)
        if not 0 < self.comm_programs < self.num_programs or self.num_programs < 2:
            raise ValueError(f"AGGemmContext: need 0 < comm_programs < num_programs, got {self.comm_programs} and "
                             f"{self.num_programs}")
        elem = torch.empty((), dtype=dtype).element_size()
        self.block = 1024 if self.world.interpreted else (16 << 10) // elem  # elements per copy tile
        self.gathered = self._alloc((max_m, k), dtype)
        self.pad = self._alloc((REGIONS.value * self.num_programs * world,), torch.int32, zero=True)
        self.signals = self._alloc((3 * world + 1,), torch.int32, zero=True)
        label_pad(self.pad, self.op, world)
        label_words(self.signals, self.op, lambda i: (
            (f"done signal of rank {i} (it finished reading my gathered rows)", i) if i < world else
            (f"flag of chunk {i - world} (that rank's rows are in my gathered buffer)", None) if i < 2 * world else
            ("chunk copy counter", None)))
        self.peer_gathered = [triton_dist.peer_view(self.gathered, p) for p in range(world)]
        if world == 1:  # the one chunk is always there: its flag stays raised (no per-call kernel to raise it)
            self.signals[1].fill_(2 ** 31 - 1)
        self.world.barrier(f"creating a context of {self.op}")  # every rank's signals are zero before anyone raises one


def pick_method(m: int, n: int = 1 << 30) -> str:
    """The automatic choice by the rows and columns of C."""
    if (m <= SEQUENTIAL_MAX_M and n < SEQUENTIAL_WIDE_N) or n <= SEQUENTIAL_MAX_N:
        return "sequential"
    return "copy_engine" if m >= COPY_ENGINE_MIN_M else AUTO_METHOD


def _gather_copy_engine(ctx: AGGemmContext, a: torch.Tensor, m_loc: int, epoch: torch.Tensor, sig: int) -> None:
    rank, world = ctx.world.rank, ctx.world.world_size
    _ce_begin_kernel[(1,)](ctx.signals, epoch, num_warps=1)
    ctx.gathered[rank * m_loc:(rank + 1) * m_loc].copy_(a)
    arrived, publish = rank, True
    for i in range(1, world + 1):
        src = (rank + i) % world if i < world else -1
        _ce_step_kernel[(1,)](ctx.signals, ctx.pad, epoch, arrived, src, sig, PUBLISH=publish, num_warps=1)
        if src >= 0:
            rows = slice(src * m_loc, (src + 1) * m_loc)
            ctx.gathered[rows].copy_(ctx.peer_gathered[src][rows])
        arrived, publish = src, False


def ag_gemm(a: torch.Tensor, b: torch.Tensor, *, ctx: AGGemmContext, method: str = "auto",
            return_gathered: bool = False, out: torch.Tensor | None = None):
    """``all_gather(a) @ b`` (``(world*m) x N``) with the gather overlapped with the GEMM; no host sync.

    ``return_gathered=True`` returns ``(C, A)`` where ``A`` is a view of the context's gathered buffer, valid until
    the next call on this context."""
    check_operands("ag_gemm", a, b)
    check_method("ag_gemm", method, METHODS)
    world = ctx.world.world_size
    m_loc, k = a.shape
    n = b.shape[1]
    m = world * m_loc
    ctx.check_call(a, b, m, k, n)
    out = check_out("ag_gemm", out, (m, n), a.dtype, a.device)
    gathered = ctx.gathered[:m]
    if m == 0 or n == 0:
        return (out, gathered) if return_gathered else out
    method = pick_method(m, n) if method == "auto" else method
    if world == 1:  # nothing to gather: a @ b alone, on every SM, and no signal changes, so no epoch bump (our
        # GEMM's chunk wait stays in the kernel, on the flag raised at the context's creation); the gathered A only
        # when asked for
        if method == "sequential":
            torch.matmul(a, b, out=out)
        else:
            _gemm(ctx, a, b, out, m_loc, ctx.epoch, ctx.num_programs)
        if return_gathered:
            gathered.copy_(a)
        return (out, gathered) if return_gathered else out
    epoch = ctx.next_epoch()
    sig = call_signature("ag_gemm", method, a.dtype, m_loc * k, k)  # N may differ across ranks (own B)
    if method == "sequential":
        _ag_pull_kernel[(ctx.num_programs,)](a, ctx.gathered, ctx.signals, ctx.pad, epoch, m_loc * k, sig,
                                             BLOCK=ctx.block, num_warps=8)
        torch.matmul(gathered, b, out=out)
        return (out, gathered) if return_gathered else out
    with ctx.forked():
        with ctx.side_stream():
            gather_chunks(ctx, a, epoch, sig, method)
        _gemm(ctx, gathered, b, out, m_loc, epoch, consumer_programs(ctx, method))
    return (out, gathered) if return_gathered else out


def gather_chunks(ctx: AGGemmContext, a: torch.Tensor, epoch: torch.Tensor, sig: int, method: str) -> None:
    """The communication of one overlapped call: gather every rank's ``a`` (``m_loc`` rows of ``ctx.k``) into
    ``ctx.gathered`` chunk by chunk, raising ``flag[c]`` (``ctx.signals[world + c]``) to ``epoch`` when chunk ``c``
    is in (methods ``sm``: the pull kernel on ``ctx.comm_programs`` programs, ``copy_engine``: DMA copies between
    one-program step kernels). Launch it on the side stream inside ``ctx.forked()``; the consumer kernel on the main
    stream waits ``flag[c] >= epoch`` before reading chunk ``c`` (any kernel family: ag_gemm's GEMM, the
    sequence-parallel attention's K/V). ``sig``: the call's signature (``_common.call_signature``)."""
    if method == "sm":
        _ag_pull_kernel[(ctx.comm_programs,)](a, ctx.gathered, ctx.signals, ctx.pad, epoch, a.shape[0] * a.shape[1],
                                              sig, BLOCK=ctx.block, num_warps=8)
    elif method == "copy_engine":
        _gather_copy_engine(ctx, a, a.shape[0], epoch, sig)
    else:
        raise ValueError(f"gather_chunks: method must be 'sm' or 'copy_engine', got {method!r}")


def consumer_programs(ctx: AGGemmContext, method: str) -> int:
    """SMs left to the consumer kernel next to :func:`gather_chunks` (``sm``: the pull kernel's programs taken;
    ``copy_engine``: one, for the step kernels)."""
    return ctx.num_programs - (ctx.comm_programs if method == "sm" else 1)


def _gemm(ctx: AGGemmContext, src: torch.Tensor, b: torch.Tensor, out: torch.Tensor, m_loc: int,
          epoch: torch.Tensor, budget: int) -> None:
    """Launch the persistent GEMM over ``src`` (the gathered A, or at world size 1 ``a`` itself) on up to ``budget``
    programs; TMA stores where every chunk is a whole number of row tiles."""
    cfg = ctx.config
    k, n = src.shape[1], b.shape[1]
    a_arg, b_arg, use_tma, b_trans = operands(src, b, cfg)
    c_desc, tma_store = store_operand(out, cfg, use_tma and m_loc % cfg.block_m == 0)
    tiles = ctx.world.world_size * triton.cdiv(m_loc, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _ag_gemm_kernel[(min(budget, tiles),)](
        a_arg, b_arg, out, c_desc, ctx.signals, epoch, m_loc, n, k, src.stride(0), src.stride(1), b.stride(0),
        b.stride(1), out.stride(0), out.stride(1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, USE_TMA=use_tma, B_TRANS=b_trans, DOT_PRECISION=dot_precision(src.dtype),
        TMA_STORE=tma_store, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def ag_gemm_reference(a: torch.Tensor, b: torch.Tensor, *, return_gathered: bool = False):
    """torch.distributed.all_gather, then torch.matmul."""
    world = triton_dist.current_world()
    parts = [torch.empty_like(a) for _ in range(world.world_size)]
    dist.all_gather(parts, a.contiguous(), group=world.group)
    gathered = torch.cat(parts, dim=0)
    c = torch.matmul(gathered, b)
    return (c, gathered) if return_gathered else c
