"""Ulysses sequence parallelism: all-to-alls between sequence-sharded and head-sharded attention inputs.

``W`` ranks each hold ``S_loc`` tokens of the sequence (rank ``r``: tokens ``[r*S_loc, (r+1)*S_loc)``; every rank
the same ``S_loc``: pad the last shard) with all heads. Attention needs every token of a head, so before it
:func:`ulysses_pre_attn` trades tokens for heads and after it :func:`ulysses_post_attn` trades them back:

* ``ulysses_pre_attn(q, k, v)``: q ``[S_loc, Hq, D]``, k / v ``[S_loc, Hkv, D]`` -> q ``[W*S_loc, Hq/W, D]``
  (q heads ``[r*Hq/W, (r+1)*Hq/W)`` on rank ``r``), k / v ``[W*S_loc, Hkv_r, D]`` with the kv heads those q heads
  read. GQA-aware: with ``Hkv >= W`` (``Hkv % W == 0``) each rank gets ``Hkv/W`` kv heads; with ``Hkv < W`` (``W %
  Hkv == 0``) each kv head goes to the ``W/Hkv`` ranks whose q heads share it (one kv head per rank, replicated),
  so the local attention keeps the group ratio ``Hq/Hkv`` (or runs ``Hq/W`` q heads on one kv head).
* ``ulysses_post_attn(o)``: o ``[W*S_loc, Hq/W, D]`` -> ``[S_loc, Hq, D]``, this rank's tokens with every head.

Each is one call of :func:`~triton_dist.kernels.all_to_all.all_to_all` (q, k and v packed into one message per
peer, so one launch and one signal round trip), with a pack copy before and an unpack copy after (a permute of
``S_loc x heads`` blocks). Equal splits and no host sync: CUDA-graph capturable like the all-to-all. The ``_reference``
functions do the same with ``torch.distributed.all_to_all_single``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import triton_dist
from triton_dist.kernels import all_to_all as _a2a

from ._common import DTYPES, check_tensor


def kv_heads_per_rank(hq: int, hkv: int, world: int) -> int:
    """kv heads each rank holds after :func:`ulysses_pre_attn` (``Hkv/W``, or 1 when ``W`` ranks share fewer kv
    heads)."""
    return hkv // world if hkv >= world else 1


def _kv_head_of(rank: int, hkv: int, world: int) -> slice:
    """The kv heads rank ``rank`` needs: the ones its q heads read."""
    if hkv >= world:
        n = hkv // world
        return slice(rank * n, (rank + 1) * n)
    h = rank // (world // hkv)
    return slice(h, h + 1)


def check_ulysses_heads(what: str, hq: int, hkv: int, world: int) -> None:
    """q heads split evenly over the ranks, and kv heads either split evenly or shared by whole groups of ranks."""
    if hq % world:
        raise ValueError(f"{what}: {hq} q heads do not split over {world} ranks (Hq % world must be 0)")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{what}: q has {hq} heads and k/v {hkv}; the q heads must be a multiple of the kv heads")
    if (hkv >= world and hkv % world) or (hkv < world and world % hkv):
        raise ValueError(f"{what}: {hkv} kv heads over {world} ranks: the kv heads must be a multiple of the world "
                         "size, or divide it (each kv head then replicated to world/Hkv ranks)")


def _check_qkv(what: str, q, k, v) -> None:
    check_tensor(what, "q", q, 3, DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(what, name, t, 3, (q.dtype,), q.device)
        if t.shape[0] != q.shape[0] or t.shape[2] != q.shape[2]:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}; expected [{q.shape[0]}, Hkv, {q.shape[2]}] "
                             f"(q's tokens and head dim)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{what}: k has {k.shape[1]} heads and v {v.shape[1]}; they must be equal")


def ulysses_pre_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str = "auto"):
    """Sequence-sharded q / k / v of this rank -> head-sharded q / k / v over the whole sequence (module docstring).

    q ``[S_loc, Hq, D]``, k / v ``[S_loc, Hkv, D]`` (the same dtype; ``S_loc`` equal on every rank). Returns
    ``(q [W*S_loc, Hq/W, D], k, v [W*S_loc, kv_heads_per_rank, D])``, contiguous, tokens in global order. Collective.
    ``method``: the all-to-all's (``auto``, ``kernel``, ``copy_engine``)."""
    what = "ulysses_pre_attn"
    _check_qkv(what, q, k, v)
    world = triton_dist.current_world().world_size
    s, hq, d = q.shape
    hkv = k.shape[1]
    check_ulysses_heads(what, hq, hkv, world)
    hq_r, hkv_r = hq // world, kv_heads_per_rank(hq, hkv, world)
    width = hq_r + 2 * hkv_r
    send = torch.empty((world, s, width, d), dtype=q.dtype, device=q.device)
    send[:, :, :hq_r].copy_(q.view(s, world, hq_r, d).transpose(0, 1))
    for j in range(world):  # the kv heads peer j's q heads read
        kv = _kv_head_of(j, hkv, world)
        send[j, :, hq_r:hq_r + hkv_r].copy_(k[:, kv])
        send[j, :, hq_r + hkv_r:].copy_(v[:, kv])
    recv = _a2a.all_to_all(send.view(world * s, width, d), method=method)
    recv = recv.view(world * s, width, d)
    return (recv[:, :hq_r].contiguous(), recv[:, hq_r:hq_r + hkv_r].contiguous(),
            recv[:, hq_r + hkv_r:].contiguous())


def ulysses_post_attn(o: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """Head-sharded attention output ``[W*S_loc, Hq/W, D]`` -> this rank's tokens with all heads ``[S_loc, Hq, D]``
    (the inverse of :func:`ulysses_pre_attn` for q). Collective."""
    what = "ulysses_post_attn"
    check_tensor(what, "o", o, 3, DTYPES)
    world = triton_dist.current_world().world_size
    if o.shape[0] % world:
        raise ValueError(f"{what}: o has {o.shape[0]} tokens, not a multiple of the world size {world}")
    s, hq_r, d = o.shape[0] // world, o.shape[1], o.shape[2]
    recv = _a2a.all_to_all(o.contiguous(), method=method)  # chunk i: rank i's heads of my tokens
    return recv.view(world, s, hq_r, d).transpose(0, 1).reshape(s, world * hq_r, d)


def ulysses_pre_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """:func:`ulysses_pre_attn` with ``torch.distributed.all_to_all_single`` (and per-head copies)."""
    world = triton_dist.current_world()
    w = world.world_size
    s, hq, d = q.shape
    hkv = k.shape[1]
    hq_r = hq // w

    def a2a(parts):
        x = torch.cat([p.unsqueeze(0) for p in parts]).contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=world.group)
        return out.reshape(w * s, *x.shape[2:])

    return (a2a([q[:, j * hq_r:(j + 1) * hq_r] for j in range(w)]),
            a2a([k[:, _kv_head_of(j, hkv, w)] for j in range(w)]),
            a2a([v[:, _kv_head_of(j, hkv, w)] for j in range(w)]))


def ulysses_post_attn_reference(o: torch.Tensor) -> torch.Tensor:
    """:func:`ulysses_post_attn` with ``torch.distributed.all_to_all_single``."""
    world = triton_dist.current_world()
    w = world.world_size
    s = o.shape[0] // w
    out = torch.empty_like(o.contiguous())
    dist.all_to_all_single(out, o.contiguous(), group=world.group)
    return torch.cat([out[i * s:(i + 1) * s] for i in range(w)], dim=1)
