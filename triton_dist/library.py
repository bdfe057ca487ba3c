"""Our ops as PyTorch custom operators: ``import triton_dist.library`` registers them as ``torch.ops.triton_dist.*``.

A registered op is one opaque node to ``torch.compile`` (``fullgraph=True`` traces through it with no graph break),
``torch.export`` and AOT autograd: its fake implementation gives the output's shape, dtype and layout without
running anything, and its real implementation calls the op of :mod:`triton_dist.ops` of the same name, so the
contexts and symmetric buffers that op caches are shared with direct calls. Importing this module registers the ops
and does nothing else (no world, no allocation, no compilation); :mod:`triton_dist` does not import it.

Registered ops (schemas as ``str(torch.ops.triton_dist.<op>.default._schema)`` prints them, long ones wrapped; a
mutated tensor's alias set written ``(a!)``, ``SymInt`` as ``int``)::

    triton_dist::all_reduce(Tensor x, *, str method="auto") -> Tensor
    triton_dist::all_gather(Tensor x, *, str method="auto") -> Tensor
    triton_dist::reduce_scatter(Tensor x, *, str method="auto") -> Tensor
    triton_dist::ag_gemm(Tensor a, Tensor b, *, str method="auto") -> Tensor
    triton_dist::gemm_rs(Tensor a, Tensor b, *, str method="auto") -> Tensor
    triton_dist::gemm_ar(Tensor a, Tensor b, *, str method="auto") -> Tensor
    triton_dist::flash_attn(Tensor q, Tensor k, Tensor v, *, bool causal=False, float? scale=None,
        float softcap=0.) -> Tensor
    triton_dist::flash_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_lens,
        Tensor? block_table=None, *, float? scale=None, float softcap=0.) -> Tensor
    triton_dist::decode_gemm(Tensor a, Tensor b) -> Tensor
    triton_dist::tp_moe_ag_rs(Tensor x, Tensor w1, Tensor w2, Tensor topk_ids, Tensor topk_weights, *,
        str method="copy_engine") -> Tensor
    triton_dist::tp_moe_ar(Tensor x, Tensor w1, Tensor w2, Tensor topk_ids, Tensor topk_weights) -> Tensor
    triton_dist::rmsnorm(Tensor x, Tensor weight, float eps) -> Tensor
    triton_dist::add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)
    triton_dist::silu_mul(Tensor x) -> Tensor
    triton_dist::ep_moe_dispatched(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, *,
        int num_experts) -> Tensor
    triton_dist::ep_moe_local(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, *,
        int first) -> Tensor
    triton_dist::qk_norm_rope_cache(Tensor qkv, Tensor positions, Tensor inv_freq, Tensor(a!) k_cache,
        Tensor(a!) v_cache, Tensor? q_norm, Tensor? k_norm, Tensor? block_table, *, int num_heads,
        int num_kv_heads, int seq, float eps) -> (Tensor, Tensor, Tensor)

Shapes and methods are those of :mod:`triton_dist.ops` (``W`` = world size): ``all_gather`` (m, ...) -> (W*m, ...),
``reduce_scatter`` (W*m, ...) -> (m, ...), ``ag_gemm`` (m, K) @ (K, N) -> (W*m, N), ``gemm_rs`` (M, K_loc) @ (K_loc,
N) -> (M/W, N), ``gemm_ar`` -> (M, N); ``flash_attn`` q [B, Tq, Hq, D] -> q's shape, ``flash_decode`` q [B, Hq, D]
-> q's shape; ``decode_gemm`` (1 to 256 rows) is local and needs no world. The two MoE ops fuse what
:class:`triton_dist.layers.moe.TPMoE` does with the plan objects, which a schema cannot carry:
``w1`` [E, H, 2*I_loc] (this rank's gate columns, then its up columns: ``gate_up_proj.transpose(1, 2)`` of the
layer), ``w2`` [E, I_loc, H], ``topk_ids`` [T, k] int32/int64, ``topk_weights`` [T, k]; the activation is
``silu(gate) * up``. ``tp_moe_ag_rs``: sequence-sharded tokens x [T_loc, H] -> this rank's tokens [T_loc, H]
(:func:`~triton_dist.ops.ag_moe` then :func:`~triton_dist.ops.moe_rs`); ``tp_moe_ar``: tokens replicated on every
rank (decode) x [T, H] -> [T, H] (:func:`~triton_dist.ops.moe_plan`, :func:`~triton_dist.ops.moe_gemm`,
:func:`~triton_dist.ops.moe_ar`). The decoder kernels of :mod:`triton_dist.kernels.decoder`: ``rmsnorm`` /
``add_rmsnorm`` (``(norm(x + residual), x + residual)``), ``silu_mul``, and ``qk_norm_rope_cache``, the one op that
mutates its arguments (it writes k / v into ``k_cache`` / ``v_cache``, declared in its schema) and returns ``(q, k,
v)`` [T, H, D]. The expert-parallel MoE of :mod:`triton_dist.kernels.moe.ep_moe`: ``ep_moe_dispatched`` (token
shards through the EP dispatch and combine; its EP context is cached by shape inside the op) and ``ep_moe_local``
(replicated tokens: this rank's experts' fp32 partial; ``w13`` [L, 2I, H], ``w2`` [L, H, I]).
:func:`triton_dist.layers.use_registered_ops` makes the layers call these registrations, so a whole
model compiles (``tests/test_models.py``).

Differences from the direct calls, all because an operator schema is functional (it mutates nothing and returns new
tensors that alias nothing):

* no ``out=``; ``return_lse`` and ``ag_gemm``'s ``return_gathered`` are not offered (the gathered A is a view of a
  context buffer that the next call overwrites: no tensor a compiler may keep);
* ``x`` of the collectives and ``a`` of the GEMMs may have any layout (they are made contiguous first: under a
  compiler the layout is its choice); the outputs are contiguous.

Fake implementations read the world size from :func:`triton_dist.current_world` when they run (at trace time), so a
graph traced in a world of ``W`` ranks has ``W`` baked in. The collectives are collective as ever: every rank runs
the same graph, with the same shapes.

No autograd formula is registered (the backward of a collective is a convention of the parallel scheme, e.g.
Megatron's conjugate f / g, not a property of the op): a backward through these ops raises, and so does
``torch.compile`` of a function whose inputs require grad (``nn.Parameter`` weights: AOT autograd traces the
backward at compile time). Run and compile for inference under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""
import typing

import torch

from . import ops
from .kernels import decode_gemm as _dg
from .kernels import decoder as _dec
from .runtime.world import current_world

__all__ = ["all_reduce", "all_gather", "reduce_scatter", "ag_gemm", "gemm_rs", "gemm_ar", "flash_attn",
           "flash_decode", "decode_gemm", "tp_moe_ag_rs", "tp_moe_ar", "rmsnorm", "add_rmsnorm", "silu_mul",
           "qk_norm_rope_cache", "ep_moe_dispatched", "ep_moe_local"]

Tensor = torch.Tensor


def _op(name: str):
    """``torch.library.custom_op`` of a functional op ``triton_dist::<name>`` (schema inferred from the hints)."""
    return torch.library.custom_op(f"triton_dist::{name}", mutates_args=())


def _world_size() -> int:
    return current_world().world_size


def _dim0(what: str, x: Tensor) -> None:
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension (rows along dim 0), got a 0-d tensor")


def _matrices(what: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{what}: expected a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")


# ------------------------------------------------------------------------------------------------ collectives
@_op("all_reduce")
def all_reduce(x: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.all_reduce`: the sum of ``x`` over all ranks, same shape."""
    return ops.all_reduce(x.contiguous(), method=method)


@all_reduce.register_fake
def _(x, *, method="auto"):
    return x.new_empty(x.shape)


@_op("all_gather")
def all_gather(x: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.all_gather`: every rank's ``x`` (m, ...) stacked along dim 0: (W*m, ...)."""
    return ops.all_gather(x.contiguous(), method=method)


@all_gather.register_fake
def _(x, *, method="auto"):
    _dim0("all_gather", x)
    return x.new_empty((_world_size() * x.shape[0], *x.shape[1:]))


@_op("reduce_scatter")
def reduce_scatter(x: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.reduce_scatter`: chunk ``rank`` of the sum over ranks of ``x`` (W*m, ...): (m, ...)."""
    return ops.reduce_scatter(x.contiguous(), method=method)


@reduce_scatter.register_fake
def _(x, *, method="auto"):
    _dim0("reduce_scatter", x)
    world = _world_size()
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 of x ({tuple(x.shape)}) must be a multiple of the world size {world}")
    return x.new_empty((x.shape[0] // world, *x.shape[1:]))


# ------------------------------------------------------------------------------------------------ GEMMs
@_op("ag_gemm")
def ag_gemm(a: Tensor, b: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.ag_gemm`: ``all_gather(a) @ b``, a (m, K), b (K, N): (W*m, N)."""
    return ops.ag_gemm(a.contiguous(), b, method=method)


@ag_gemm.register_fake
def _(a, b, *, method="auto"):
    _matrices("ag_gemm", a, b)
    return a.new_empty((_world_size() * a.shape[0], b.shape[1]))


@_op("gemm_rs")
def gemm_rs(a: Tensor, b: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.gemm_rs`: this rank's rows of ``sum over ranks of a @ b``, a (M, K_loc): (M/W, N)."""
    return ops.gemm_rs(a.contiguous(), b, method=method)


@gemm_rs.register_fake
def _(a, b, *, method="auto"):
    _matrices("gemm_rs", a, b)
    world = _world_size()
    if a.shape[0] % world:
        raise ValueError(f"gemm_rs: rows of a ({a.shape[0]}) must be a multiple of the world size {world}")
    return a.new_empty((a.shape[0] // world, b.shape[1]))


@_op("gemm_ar")
def gemm_ar(a: Tensor, b: Tensor, *, method: str = "auto") -> Tensor:
    """:func:`triton_dist.ops.gemm_ar`: ``sum over ranks of a @ b``: (M, N) on every rank."""
    return ops.gemm_ar(a.contiguous(), b, method=method)


@gemm_ar.register_fake
def _(a, b, *, method="auto"):
    _matrices("gemm_ar", a, b)
    return a.new_empty((a.shape[0], b.shape[1]))


@_op("decode_gemm")
def decode_gemm(a: Tensor, b: Tensor) -> Tensor:
    """:func:`triton_dist.kernels.decode_gemm.decode_gemm`: ``a @ b`` for 1 to 256 rows; local, no world needed."""
    return _dg.decode_gemm(a.contiguous(), b)


@decode_gemm.register_fake
def _(a, b):
    _matrices("decode_gemm", a, b)
    return a.new_empty((a.shape[0], b.shape[1]))


# ------------------------------------------------------------------------------------------------ attention
@_op("flash_attn")
def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: typing.Optional[float] = None,
               softcap: float = 0.0) -> Tensor:
    """:func:`triton_dist.ops.flash_attn`: prefill attention, q [B, Tq, Hq, D], k / v [B, Tk, Hkv, D]; local."""
    return ops.flash_attn(q, k, v, causal=causal, scale=scale, softcap=softcap)


@flash_attn.register_fake
def _(q, k, v, *, causal=False, scale=None, softcap=0.0):
    return q.new_empty(q.shape)


@_op("flash_decode")
def flash_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor,
                 block_table: typing.Optional[Tensor] = None, *, scale: typing.Optional[float] = None,
                 softcap: float = 0.0) -> Tensor:
    """:func:`triton_dist.ops.flash_decode`: decode attention of q [B, Hq, D] over a contiguous or paged (with
    ``block_table``) KV cache; local. (``block_table`` may be passed by position: a schema has no keyword-only
    tensors.)"""
    return ops.flash_decode(q, k_cache, v_cache, kv_lens, block_table=block_table, scale=scale, softcap=softcap)


@flash_decode.register_fake
def _(q, k_cache, v_cache, kv_lens, block_table=None, *, scale=None, softcap=0.0):
    return q.new_empty(q.shape)


# ------------------------------------------------------------------------------------------------ MoE
def _moe_fake(what: str, x, w1, w2, topk_ids, topk_weights):
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3 or w1.shape[2] != 2 * w2.shape[1] or \
            w2.shape[2] != x.shape[1]:
        raise ValueError(f"{what}: expected x [T, H], w1 [E, H, 2*I_loc], w2 [E, I_loc, H]; got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    return x.new_empty(x.shape)


@_op("tp_moe_ag_rs")
def tp_moe_ag_rs(x: Tensor, w1: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor, *,
                 method: str = "copy_engine") -> Tensor:
    """Tensor-parallel MoE on sequence-sharded tokens x [T_loc, H]: :func:`triton_dist.ops.ag_moe` (``method``: its
    gather's), ``silu(gate) * up``, :func:`triton_dist.ops.moe_rs`: this rank's tokens [T_loc, H]."""
    return ops.tp_moe_ag_rs(x, w1, w2, topk_ids, topk_weights, method=method)


@tp_moe_ag_rs.register_fake
def _(x, w1, w2, topk_ids, topk_weights, *, method="copy_engine"):
    return _moe_fake("tp_moe_ag_rs", x, w1, w2, topk_ids, topk_weights)


@_op("tp_moe_ar")
def tp_moe_ar(x: Tensor, w1: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """Tensor-parallel MoE on tokens replicated on every rank (decode), x [T, H]: :func:`triton_dist.ops.moe_plan`,
    :func:`triton_dist.ops.moe_gemm`, ``silu(gate) * up``, :func:`triton_dist.ops.moe_ar`: [T, H] on every rank."""
    return ops.tp_moe_ar(x, w1, w2, topk_ids, topk_weights)


@tp_moe_ar.register_fake
def _(x, w1, w2, topk_ids, topk_weights):
    return _moe_fake("tp_moe_ar", x, w1, w2, topk_ids, topk_weights)



# ------------------------------------------------------------------------------------------------ decoder kernels
@_op("rmsnorm")
def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`triton_dist.kernels.decoder.add_rmsnorm` without a residual: ``rmsnorm(x) * weight``, x [T, N]."""
    return _dec.add_rmsnorm(x.contiguous(), weight, eps)[0]


@rmsnorm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@_op("add_rmsnorm")
def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> typing.Tuple[Tensor, Tensor]:
    """:func:`triton_dist.kernels.decoder.add_rmsnorm`: ``(rmsnorm(x + residual) * weight, x + residual)``."""
    return _dec.add_rmsnorm(x.contiguous(), weight, eps, residual.contiguous())


@add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@_op("silu_mul")
def silu_mul(x: Tensor) -> Tensor:
    """:func:`triton_dist.kernels.decoder.silu_mul`: ``silu(x[:, :I]) * x[:, I:]`` of x [T, 2 I]."""
    return _dec.silu_mul(x.contiguous())


@silu_mul.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("triton_dist::qk_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_cache(qkv: Tensor, positions: Tensor, inv_freq: Tensor, k_cache: Tensor, v_cache: Tensor,
                       q_norm: typing.Optional[Tensor], k_norm: typing.Optional[Tensor],
                       block_table: typing.Optional[Tensor], *, num_heads: int, num_kv_heads: int, seq: int,
                       eps: float) -> typing.Tuple[Tensor, Tensor, Tensor]:
    """:func:`triton_dist.kernels.decoder.qk_norm_rope_cache` (k / v stored into the caches): ``(q, k, v)``."""
    return _dec.qk_norm_rope_cache(qkv.contiguous(), positions, inv_freq, k_cache, v_cache, num_heads=num_heads,
                                   num_kv_heads=num_kv_heads, seq=seq, q_norm=q_norm, k_norm=k_norm, eps=eps,
                                   block_table=block_table, return_kv=True)


@qk_norm_rope_cache.register_fake
def _(qkv, positions, inv_freq, k_cache, v_cache, q_norm, k_norm, block_table, *, num_heads, num_kv_heads, seq,
      eps):
    t, d = qkv.shape[0], k_cache.shape[-1]
    return (qkv.new_empty((t, num_heads, d)), qkv.new_empty((t, num_kv_heads, d)),
            qkv.new_empty((t, num_kv_heads, d)))


# ------------------------------------------------------------------------------------------------ expert-parallel MoE
@_op("ep_moe_dispatched")
def ep_moe_dispatched(x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor, *,
                      num_experts: int) -> Tensor:
    """:func:`triton_dist.kernels.moe.ep_moe.ep_moe_dispatched`: this rank's tokens x [T, H] -> [T, H]."""
    from .kernels.moe import ep_moe
    return ep_moe.ep_moe_dispatched(x.contiguous(), w13, w2, topk_ids, topk_weights, num_experts)


@ep_moe_dispatched.register_fake
def _(x, w13, w2, topk_ids, topk_weights, *, num_experts):
    return x.new_empty(x.shape)


@_op("ep_moe_local")
def ep_moe_local(x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor, *, first: int) -> Tensor:
    """:func:`triton_dist.kernels.moe.ep_moe.ep_moe_local`: the fp32 partial [T, H] of this rank's experts."""
    from .kernels.moe import ep_moe
    return ep_moe.ep_moe_local(x.contiguous(), w13, w2, topk_ids, topk_weights, first)


@ep_moe_local.register_fake
def _(x, w13, w2, topk_ids, topk_weights, *, first):
    return x.new_empty(x.shape, dtype=torch.float32)
