"""Distributed flash-decoding: the KV sequence sharded over the ranks, the query replicated.

Shards (``W`` ranks): every rank holds the same ``q`` [B, Hq, D] and its own part of every sequence's KV (contiguous
[B, T_r, Hkv, D] or paged, as in :func:`~triton_dist.kernels.attention.flash_decode.flash_decode`) with its own
``kv_lens`` [B] (any split of a sequence over the ranks, zeros included). Attention over the concatenation of the
ranks' keys is the LSE merge of the ranks' partial results (``_common``: the merge is order-free), so one call is:

1. the local split-KV decode of this rank's shard -> partial ``out`` [B, Hq, D] fp32 and ``lse`` [B, Hq];
2. an all-gather of the partials packed as ``[B, Hq, D + 1]`` fp32 (out, then lse), by our LL protocol
   (:mod:`~triton_dist.kernels.all_gather`, method ``ll``: one NVLink hop, no signals) when it fits
   (``_ll.LL_MAX_BYTES`` per rank: B * Hq * (D + 1) * 4 bytes; B=1, 32 heads, D=128: 16.5 KB), otherwise the
   all-gather's staged methods;
3. the merge of the ``W`` partials per (sequence, head) on the device
   (:func:`~triton_dist.kernels.attention.flash_decode.combine_partials`), in rank order, so every rank computes
   the same bits.

No host sync anywhere (the local decode's split count comes from the cache's bound), so a call can be captured in a
CUDA graph once its contexts exist. ``sp_flash_decode_reference`` gathers the partials with torch.distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import triton_dist
from triton_dist.kernels import all_gather as _ag

from ._common import DTYPES, check_tensor, merge_partials_reference
from .flash_decode import combine_partials, flash_decode, flash_decode_reference


def packed_numel(q: torch.Tensor) -> int:
    """Elements per rank of the gathered message: ``B * Hq * (D + 1)`` fp32 (the partial output and its lse); a clear
    error first when ``q`` is not a [B, Hq, D] tensor of a supported dtype (before any collective context exists)."""
    check_tensor("sp_flash_decode", "q", q, 3, DTYPES)
    b, hq, d = q.shape
    return b * hq * (d + 1)


def sp_flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                    ctx: _ag.AllGatherContext, block_table: torch.Tensor | None = None, scale: float | None = None,
                    softcap: float = 0.0, return_lse: bool = False, method: str = "auto",
                    out: torch.Tensor | None = None):
    """Attention of ``q`` over the keys of every rank's KV shard (module docstring); the same result on every rank.

    Arguments as :func:`~triton_dist.kernels.attention.flash_decode.flash_decode` for this rank's shard. ``ctx``: an
    all-gather context of fp32 with room for :func:`packed_numel` elements (``ops.sp_flash_decode`` keeps one).
    ``method``: the all-gather's (``auto``: ``ll`` when the message fits). Returns ``out`` [B, Hq, D] in q's dtype,
    or ``(out, lse)`` with ``lse`` [B, Hq] fp32 over all ranks' keys. Collective: every rank calls it with the same
    ``q`` shape (the same values, for a meaningful result) and its own cache. A world of one rank is the local
    decode itself (no gather, no second merge)."""
    if ctx.world.world_size == 1:
        return flash_decode(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale, softcap=softcap,
                            return_lse=return_lse, out=out)
    part, lse = flash_decode(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale, softcap=softcap,
                             return_lse=True, out_dtype=torch.float32)
    b, hq, d = q.shape
    world = ctx.world.world_size
    packed = torch.cat([part, lse.unsqueeze(-1)], dim=-1)  # [B, Hq, D + 1]
    gathered = _ag.all_gather(packed, ctx=ctx, method=method).view(world, b, hq, d + 1)
    parts = gathered.permute(1, 2, 0, 3)  # [B, Hq, W, D + 1]
    if out is None:
        out = torch.empty_like(q)
    lse_out = torch.empty((b, hq), dtype=torch.float32, device=q.device) if return_lse else None
    combine_partials(parts[..., :d], parts[..., d], out=out, lse_out=lse_out)  # strided views, no copy
    return (out, lse_out) if return_lse else out


def sp_flash_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                              *, block_table: torch.Tensor | None = None, scale: float | None = None,
                              softcap: float = 0.0):
    """fp32 ``(out, lse)``: each rank's partial by the torch reference, gathered with torch.distributed and merged."""
    world = triton_dist.current_world()
    part, lse = flash_decode_reference(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale,
                                       softcap=softcap)
    parts = [torch.empty_like(part) for _ in range(world.world_size)]
    lses = [torch.empty_like(lse) for _ in range(world.world_size)]
    dist.all_gather(parts, part.contiguous(), group=world.group)
    dist.all_gather(lses, lse.contiguous(), group=world.group)
    return merge_partials_reference(torch.stack(parts), torch.stack(lses), dim=0)
