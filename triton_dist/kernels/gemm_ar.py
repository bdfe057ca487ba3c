"""GEMM + AllReduce for decode shapes (small M): ``C = all_reduce(A @ B)`` in one kernel.

Shards: every rank holds ``a`` (``M x K_loc``) and ``b`` (``K_loc x N``, any strides); every rank gets
``sum_r a_r @ b_r`` (``M x N``), bit-identical on all ranks: the row-parallel linear layer of tensor parallelism
in decode.

One persistent kernel of ``P`` programs (at most one per SM, the same ``P`` and tile shape on every rank, fixed per
context). Tile ``t`` (row-major over the ``M x N`` output) belongs to program ``t % P`` on every rank, so program
``p`` only ever waits for program ``p`` of the peers (never for another program of its own launch). Program ``p``:

1. waits until program ``p`` of every rank finished reading the previous call's slots (``done >= e-1``, region
   ``DONE`` of the pad as in :mod:`._common`);
2. for each of its tiles: computes the fp32 tile, stores it (as a partial in ``partial_dtype``) into slot ``rank``
   of every rank's symmetric buffer (NVLink stores) and raises ``flags[tile][rank]`` there (release);
3. for each of its tiles: waits for ``flags[tile][*] >= e`` (acquire; one wait on ``world`` consecutive signals),
   sums the slots in rank order in fp32 and stores the output;
4. announces ``done = e`` to program ``p`` of every rank.

With step 2 program ``p`` sends the call's header (signature: M, N, partial dtype; ``_common.send_header``) to
program ``p`` of every rank, and checks every sender's before its step-3 waits: ranks calling differently stop with
``CallMismatch`` instead of waiting for tiles that never come. A header slot is rewritten only after its receiver's
``done`` of the call before (step 1).

``e`` is the call's epoch, bumped on the stream; signals only grow, so back-to-back calls and CUDA-graph replays need
no reset and no host sync. Every rank sums the same partials in the same order: identical results everywhere.

Methods: ``fused`` (the kernel above), ``sequential`` (``torch.matmul`` then our
:func:`triton_dist.kernels.all_reduce.all_reduce`), ``auto`` (fused up to ``FUSED_MAX_M`` rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import triton_dist
import triton_dist.language as dl

from . import all_reduce as _ar
from ._common import (DONE, REGIONS, announce, await_all, call_signature, check_headers, label_headers, label_pad,
                      label_words, send_headers)
from .gemm import (DTYPES, GemmConfig, OverlapContext, check_method, check_operands, check_out,
                   dot_precision, num_sms, operands, store_tile, tile_dot)

METHODS = ("fused", "sequential")
# auto: fused up to this many rows, torch.matmul + our all-reduce (LL for decode sizes) above. The 4x H100 run of
# 2026-11-28 had the one-kernel version slower at every decode M (e.g. 33.1 vs 22.5 us at M=1, 253 vs 92 us at M=256,
# LLaMA-3 shapes): its tile count (64x64 tiles) leaves the GEMM far from cuBLAS. So auto never picks it for now.
FUSED_MAX_M = 0


@triton.jit(do_not_specialize=["call_sig"])
def _gemm_ar_kernel(a, b, out_ptr, slots_ptr, flags_ptr, pad_ptr, hdr_ptr, epoch_ptr, M, N, K,
                    stride_am, stride_ak, stride_bk, stride_bn, slot_stride, call_sig,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_TMA: tl.constexpr, B_TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rank = dl.rank()
    world = dl.num_ranks()
    nprog = tl.num_programs(0)
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr)
    tiles_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    # 1. program pid of every rank finished reading the previous call's slots
    slots = dl.consume_token(slots_ptr, await_all(pad_ptr, DONE, e - 1, world))
    hdr = hdr_ptr + pid * 2 * world  # program pid's headers
    send_headers(hdr, call_sig, e, rank, world)
    # 2. my tiles: compute, push into slot `rank` everywhere, raise the tile's flag everywhere
    for t in range(pid, num_tiles, nprog):
        off_m = (t // tiles_n) * BLOCK_M
        off_n = (t % tiles_n) * BLOCK_N
        acc = tile_dot(a, b, off_m, off_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                       BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, B_TRANS, DOT_PRECISION)
        for i in range(world):
            peer = (rank + i) % world
            store_tile(dl.symm_at(slots, peer) + rank * slot_stride, acc, off_m, off_n, M, N, N, 1, BLOCK_M, BLOCK_N)
        for i in range(world):
            dl.notify(flags_ptr + t * world + rank, (rank + i) % world, e, "set", "intra_node")
    # 3. the same tiles from every rank, summed in rank order (every rank made this call: the headers)
    check_headers(hdr, call_sig, e, world)
    for t in range(pid, num_tiles, nprog):
        token = dl.wait(flags_ptr + t * world, world, "sys", "acquire", e, cmp="ge")
        base = dl.consume_token(slots_ptr, token)
        rm = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for src in range(world):
            acc += tl.load(base + src * slot_stride + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    # 4. I no longer read the slots of this call
    announce(pad_ptr, DONE, e, rank, world)


def decode_config(max_m: int, dtype: torch.dtype, world) -> GemmConfig:
    """Tiles for small M: BLOCK_M just covers M (16..64), narrow N tiles so that many SMs stream B."""
    block_m = min(64, max(16, triton.next_power_of_2(max_m)))
    if world.interpreted:
        return GemmConfig(min(block_m, 32), 32, 32, group_m=1, num_stages=1, num_warps=4)
    return GemmConfig(block_m, 64, 128 if dtype != torch.float32 else 64, group_m=1, num_stages=4, num_warps=4)


class GemmARContext(OverlapContext):
    """Slots (``world x max_m x n`` partials, symmetric), tile flags, signal pad and epoch of ``gemm_ar`` calls with
    up to ``max_m`` rows (decode: up to a few hundred), inner dimension ``k`` and ``n`` output columns.

    The tile shape and the number of programs are fixed for the context's life (tile ownership depends on them).
    ``partial_dtype``: dtype of the pushed partials (default ``dtype``); ``num_programs``: default one per SM (at
    most one per tile of ``max_m x n``), 2 in the CPU world."""

    op = "gemm_ar"

    def __init__(self, max_m: int, k: int, n: int, dtype: torch.dtype, *, config: GemmConfig | None = None,
                 partial_dtype: torch.dtype | None = None, num_programs: int | None = None):
        world = triton_dist.current_world()
        super().__init__(max_m, k, n, dtype, config or decode_config(max_m, dtype, world))
        self.partial_dtype = partial_dtype or dtype
        if self.partial_dtype not in DTYPES:
            raise TypeError(f"GemmARContext: partial_dtype {self.partial_dtype} is not supported")
        cfg = self.config
        max_tiles = triton.cdiv(max_m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        default = 2 if world.interpreted else num_sms(world)
        self.num_programs = min(num_programs or default, max_tiles)
        if not self.world.interpreted and self.num_programs > num_sms(self.world):
            raise ValueError(f"GemmARContext: num_programs {self.num_programs} exceeds the GPU's "
                             f"{num_sms(self.world)} SMs (programs wait for their peers: all must be resident)")
        self.slots = self._alloc((world.world_size, max_m, n), self.partial_dtype)
        self.flags = self._alloc((max_tiles * world.world_size,), torch.int32, zero=True)
        self.pad = self._alloc((REGIONS.value * self.num_programs * world.world_size,), torch.int32, zero=True)
        self.headers = self._alloc((self.num_programs * 2 * world.world_size,), torch.int64, zero=True)
        label_pad(self.pad, self.op, world.world_size)
        label_headers(self.headers, self.op, world.world_size, per_program=1)
        label_words(self.flags, self.op, lambda i: (f"flag of tile {i // world.world_size} from rank "
                                                     f"{i % world.world_size} (its partial is in my slots)",
                                                     i % world.world_size))
        self._ar_ctx = None
        self.world.barrier(f"creating a context of {self.op}")  # every rank's signals are zero before anyone raises one

    def all_reduce_context(self) -> _ar.AllReduceContext:
        """The collective's context of method ``sequential``, made on its first use (collective)."""
        if self._ar_ctx is None:
            self._ar_ctx = _ar.AllReduceContext(self.max_m * self.n, self.dtype)
        return self._ar_ctx

    def close(self) -> None:
        if self._ar_ctx is not None:
            self._ar_ctx.close()
            self._ar_ctx = None
        super().close()


def pick_method(m: int) -> str:
    """The automatic choice by the rows of A."""
    return "fused" if m <= FUSED_MAX_M else "sequential"


def gemm_ar(a: torch.Tensor, b: torch.Tensor, *, ctx: GemmARContext, method: str = "auto",
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum over ranks of a @ b`` (``M x N``, fp32 sum, identical on every rank); no host sync."""
    check_operands("gemm_ar", a, b)
    check_method("gemm_ar", method, METHODS)
    m, k = a.shape
    n = b.shape[1]
    ctx.check_call(a, b, m, k, n)
    out = check_out("gemm_ar", out, (m, n), a.dtype, a.device)
    if m == 0 or n == 0:
        return out
    method = pick_method(m) if method == "auto" else method
    if method == "sequential":
        return _ar.all_reduce(torch.matmul(a, b), ctx=ctx.all_reduce_context(), out=out)
    cfg = ctx.config
    epoch = ctx.next_epoch()
    a_arg, b_arg, use_tma, b_trans = operands(a, b, cfg)
    sig = call_signature("gemm_ar", method, a.dtype, m * n, str(ctx.partial_dtype))  # K may differ across ranks
    _gemm_ar_kernel[(ctx.num_programs,)](
        a_arg, b_arg, out, ctx.slots, ctx.flags, ctx.pad, ctx.headers, epoch, m, n, k, a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), ctx.max_m * n, sig,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_TMA=use_tma, B_TRANS=b_trans,
        DOT_PRECISION=dot_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gemm_ar_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul, then an fp32 all-reduce."""
    acc = torch.matmul(a, b).to(torch.float32)
    dist.all_reduce(acc, group=triton_dist.current_world().group)
    return acc.to(a.dtype)
