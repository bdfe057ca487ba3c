"""Ulysses sequence parallelism: all-to-alls between sequence-sharded and head-sharded attention inputs, alone or
overlapped with the projections around attention.

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
``S_loc x heads`` blocks). Equal splits and no host sync: CUDA-graph capturable like the all-to-all.

The fused forms overlap the all-to-all with the projection next to it, pipelined over ``chunks`` groups of this
rank's tokens (each group one all-to-all of its own, on a side stream, ordered by events):

* ``ulysses_qkv_pre_attn(x, w_qkv)``: the QKV projection ``x @ w_qkv.t()`` of token group ``g + 1`` runs on the
  current stream while group ``g``'s heads travel (and are unpacked into place) on the side stream;
* ``ulysses_post_attn_o(o, w_o)``: the all-to-alls of every group are queued on the side stream first, and the O
  projection of group ``g`` runs as soon as group ``g`` has arrived, while group ``g + 1`` travels.

The first group's projection (pre) or transfer (post) and the last group's other half are not hidden; more groups
hide more, at smaller GEMMs. In the CPU world there are no streams: the same steps run in program order. The
``_reference`` functions do the same with ``torch.distributed.all_to_all_single``.
"""
from __future__ import annotations

import contextlib

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


def _pack(q, k, v, world: int) -> torch.Tensor:
    """``[W, S, Hq/W + 2 Hkv_r, D]``: for each destination its q heads, then the k and v heads they read."""
    s, hq, d = q.shape
    hkv = k.shape[1]
    hq_r, hkv_r = hq // world, kv_heads_per_rank(hq, hkv, world)
    send = torch.empty((world, s, hq_r + 2 * hkv_r, d), dtype=q.dtype, device=q.device)
    send[:, :, :hq_r].copy_(q.reshape(s, world, hq_r, d).transpose(0, 1))
    for j in range(world):
        kv = _kv_head_of(j, hkv, world)
        send[j, :, hq_r:hq_r + hkv_r].copy_(k[:, kv])
        send[j, :, hq_r + hkv_r:].copy_(v[:, kv])
    return send


def ulysses_pre_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str = "auto"):
    """Sequence-sharded q / k / v of this rank -> head-sharded q / k / v over the whole sequence (module docstring).

    q ``[S_loc, Hq, D]``, k / v ``[S_loc, Hkv, D]`` (the same dtype; ``S_loc`` equal on every rank). Returns
    ``(q [W*S_loc, Hq/W, D], k, v [W*S_loc, kv_heads_per_rank, D])``, contiguous, tokens in global order. Collective.
    ``method``: the all-to-all's (``auto``, ``kernel``, ``copy_engine``)."""
    what = "ulysses_pre_attn"
    _check_qkv(what, q, k, v)
    world = triton_dist.current_world().world_size
    s, hq, d = q.shape
    check_ulysses_heads(what, hq, k.shape[1], world)
    hq_r, hkv_r = hq // world, kv_heads_per_rank(hq, k.shape[1], world)
    send = _pack(q, k, v, world)
    recv = _a2a.all_to_all(send.view(world * s, hq_r + 2 * hkv_r, d), method=method)
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


# ------------------------------------------------------------------------------------------------ fused forms
_side_streams: dict = {}


class _Pipeline:
    """The current stream and a side stream (one per device, reused), with events to hand chunks between them;
    in the CPU world (no streams) every method is a no-op and the steps run in program order."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        if self.gpu:
            if device not in _side_streams:
                _side_streams[device] = torch.cuda.Stream(device)
            self.main = torch.cuda.current_stream(device)
            self.side = _side_streams[device]
            self.side.wait_stream(self.main)  # inputs made before the call

    def handoff(self, to_side: bool):
        """An event recorded on one stream and waited on by the other (``to_side``: main -> side)."""
        if self.gpu:
            ev = torch.cuda.Event()
            ev.record(self.main if to_side else self.side)
            (self.side if to_side else self.main).wait_event(ev)

    def on_side(self):
        return torch.cuda.stream(self.side) if self.gpu else contextlib.nullcontext()

    def join(self):
        if self.gpu:
            self.main.wait_stream(self.side)


def _groups(s: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` (at most ``s``) near-equal token ranges of ``[0, s)``."""
    n = max(1, min(int(chunks), s))
    cuts = [s * i // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n) if cuts[i + 1] > cuts[i]]


def _check_chunks(what: str, chunks) -> None:
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"{what}: chunks must be an int >= 1, got {chunks!r}")


def ulysses_qkv_pre_attn(x: torch.Tensor, w_qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                         chunks: int = 4, method: str = "auto"):
    """``ulysses_pre_attn`` of the QKV projection ``x @ w_qkv.t()``, the projection overlapped with the all-to-all
    (module docstring). ``x`` ``[S_loc, hidden]``; ``w_qkv`` the fused ``nn.Linear`` weight ``[(Hq + 2 Hkv) * D,
    hidden]``, rows q heads, then k heads, then v heads (D from its rows). Returns ``(q, k, v)`` as
    :func:`ulysses_pre_attn`. Collective: the same shapes and ``chunks`` on every rank."""
    what = "ulysses_qkv_pre_attn"
    check_tensor(what, "x", x, 2, DTYPES)
    check_tensor(what, "w_qkv", w_qkv, 2, (x.dtype,), x.device)
    _check_chunks(what, chunks)
    hq, hkv = num_heads, num_kv_heads
    rows = w_qkv.shape[0]
    if w_qkv.shape[1] != x.shape[1] or rows % (hq + 2 * hkv):
        raise ValueError(f"{what}: w_qkv is {tuple(w_qkv.shape)}; expected [(Hq + 2 Hkv) * D, hidden] = "
                         f"[{hq + 2 * hkv} * D, {x.shape[1]}]")
    d = rows // (hq + 2 * hkv)
    world = triton_dist.current_world().world_size
    check_ulysses_heads(what, hq, hkv, world)
    s = x.shape[0]
    hq_r, hkv_r = hq // world, kv_heads_per_rank(hq, hkv, world)
    width = hq_r + 2 * hkv_r
    outs = [torch.empty((world * s, n, d), dtype=x.dtype, device=x.device) for n in (hq_r, hkv_r, hkv_r)]
    groups = _groups(s, chunks)
    ctx = _a2a.default_context(world * max(hi - lo for lo, hi in groups) * width * d * x.element_size())
    pipe = _Pipeline(x.device)
    keep = []  # made on the current stream, used on the side one: alive until the join
    for lo, hi in groups:
        qkv = torch.matmul(x[lo:hi], w_qkv.t()).view(hi - lo, hq + 2 * hkv, d)  # current stream
        send = _pack(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], world)
        recv = torch.empty_like(send)
        keep += [send, recv]
        pipe.handoff(to_side=True)
        with pipe.on_side():
            _a2a.all_to_all(send.view(world * (hi - lo), width, d), ctx=ctx, method=method,
                            out=recv.view(world * (hi - lo), width, d))
            for out, part in zip(outs, (recv[:, :, :hq_r], recv[:, :, hq_r:hq_r + hkv_r], recv[:, :, hq_r + hkv_r:])):
                out.view(world, s, -1, d)[:, lo:hi].copy_(part)  # rank i's tokens lo..hi at i * s + lo
    pipe.join()
    return tuple(outs)


def ulysses_post_attn_o(o: torch.Tensor, w_o: torch.Tensor, *, chunks: int = 4, method: str = "auto"):
    """The O projection of :func:`ulysses_post_attn`'s result, ``ulysses_post_attn(o).reshape(S_loc, -1) @
    w_o.t()``, the all-to-all overlapped with the projection (module docstring). ``o`` ``[W*S_loc, Hq/W, D]``;
    ``w_o`` the ``nn.Linear`` weight ``[hidden, Hq * D]``. Returns ``[S_loc, hidden]``. Collective."""
    what = "ulysses_post_attn_o"
    check_tensor(what, "o", o, 3, DTYPES)
    check_tensor(what, "w_o", w_o, 2, (o.dtype,), o.device)
    _check_chunks(what, chunks)
    world = triton_dist.current_world().world_size
    if o.shape[0] % world:
        raise ValueError(f"{what}: o has {o.shape[0]} tokens, not a multiple of the world size {world}")
    s, hq_r, d = o.shape[0] // world, o.shape[1], o.shape[2]
    if w_o.shape[1] != world * hq_r * d:
        raise ValueError(f"{what}: w_o is {tuple(w_o.shape)}; expected [hidden, Hq * D] = [hidden, {world * hq_r * d}]")
    out = torch.empty((s, w_o.shape[0]), dtype=o.dtype, device=o.device)
    groups = _groups(s, chunks)
    ctx = _a2a.default_context(world * max(hi - lo for lo, hi in groups) * hq_r * d * o.element_size())
    blocks = o.view(world, s, hq_r, d)
    # made on the current stream (the side stream writes the received groups, the current one reads them after an
    # event): every buffer belongs to the current stream, which waits for the side one before they are freed
    sends = [blocks[:, lo:hi].contiguous() for lo, hi in groups]  # [W, c, Hq/W, D]: my heads of rank j's group
    recvs = [torch.empty_like(x) for x in sends]
    pipe = _Pipeline(o.device)
    pipe.handoff(to_side=True)
    arrived = []
    with pipe.on_side():
        for send, recv, (lo, hi) in zip(sends, recvs, groups):
            _a2a.all_to_all(send.view(world * (hi - lo), hq_r, d), ctx=ctx, method=method,
                            out=recv.view(world * (hi - lo), hq_r, d))
            ev = None
            if pipe.gpu:
                ev = torch.cuda.Event()
                ev.record(pipe.side)
            arrived.append(ev)
    for recv, ev, (lo, hi) in zip(recvs, arrived, groups):
        if ev is not None:
            pipe.main.wait_event(ev)
        heads = recv.transpose(0, 1).reshape(hi - lo, world * hq_r * d)
        torch.matmul(heads, w_o.t(), out=out[lo:hi])
    pipe.join()
    return out


# ------------------------------------------------------------------------------------------------ references
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


def ulysses_qkv_pre_attn_reference(x: torch.Tensor, w_qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int):
    """The projection with ``torch.matmul``, then :func:`ulysses_pre_attn_reference`."""
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = torch.matmul(x, w_qkv.t()).view(x.shape[0], num_heads + 2 * num_kv_heads, d)
    return ulysses_pre_attn_reference(qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads],
                                      qkv[:, num_heads + num_kv_heads:])


def ulysses_post_attn_o_reference(o: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """:func:`ulysses_post_attn_reference`, then the projection with ``torch.matmul``."""
    back = ulysses_post_attn_reference(o)
    return torch.matmul(back.reshape(back.shape[0], -1), w_o.t())
