"""Pipeline parallelism: a :class:`~triton_dist.models.qwen3.CausalLM` split by decoder layers into stages, one stage
per rank, the hidden states handed from stage to stage by point-to-point send / recv.

Stage ``s`` of ``S`` (on rank ``s``; the world has exactly ``S`` ranks) keeps only its contiguous range of decoder
layers (:func:`stage_layers`: as even as possible, the earlier stages taking the remainder, or the counts given),
the first stage also the embedding, the last the final norm and ``lm_head`` (and, with tied embeddings, the
embedding as the head's weight). Module names stay the checkpoint's (``model.layers.{i}`` with the global ``i``), so
:func:`~triton_dist.models.loader.load_checkpoint` reads only the stage's tensors and
:func:`~triton_dist.models.loader.init_random` gives every stage the same weights as the unsplit model.

A forward call (every stage calls it, with the same :class:`~triton_dist.layers.Step`): the first stage embeds the
token ids, the others receive the residual stream ``[tokens, hidden]`` (the input of the next layer's norm) from the
previous stage; each runs its layers with its own KV caches (:meth:`PipelineStage.new_caches`) and sends the
residual stream on to the next stage. The last stage returns the logits; the others return ``None``. One call is one
batch through every stage in turn; a schedule with several micro-batches in flight (each with its own caches) calls
forward once per micro-batch, in the same order on every stage (a send runs up to two calls ahead of its recv).

Logits stay on the last stage: sampling happens there, and :meth:`PipelineStage.tokens_to_first` sends the chosen
token ids (``[batch]`` int64, 8 bytes a sequence instead of ``vocab`` fp32 logits) to stage 0, which embeds them in
the next step. Stages are orthogonal to tensor parallelism; for now each stage is one rank at TP size 1
(:func:`build_stage`; a model split over more ranks is refused).

Transport by mode (the model's ``parallelize`` mode): ``torch`` uses ``torch.distributed.send`` / ``recv``; every
other mode our :class:`~triton_dist.kernels.p2p.P2PContext` kernels (no host sync, CUDA-graph capturable), made
when the stage is built: a collective step, so every rank builds its stage at the same point of its program.

A stage's layers run their kernels while the other stages run theirs (or wait in a recv), so their autotuning
(:func:`triton_dist.tune.choose`, collective by default) runs inside :func:`triton_dist.tune.local`: each stage tunes
on its own timings. (Collective tuning there waits for ranks that never make the call: the likely cause of the
two-stage test's hang on one H200 in the seventh session, before this.)
"""
from __future__ import annotations

import torch
from torch import nn

import triton_dist
from triton_dist import tune
from triton_dist.kernels import p2p
from triton_dist.layers import KVCache, Parallel, Step, materialize, parallelize

from .config import ModelConfig
from .qwen3 import CausalLM


def stage_layers(num_layers: int, num_stages: int, layers=None) -> list[range]:
    """The decoder layers of each stage: ``layers`` (a count per stage, summing to ``num_layers``) or, without it, as
    even as possible with the remainder on the earlier stages."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"stage_layers: num_stages must be an int >= 1, got {num_stages!r}")
    if layers is None:
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (s < extra) for s in range(num_stages)]
    else:
        counts = list(layers)
        if len(counts) != num_stages or not all(isinstance(c, int) and c >= 0 for c in counts) or \
                sum(counts) != num_layers:
            raise ValueError(f"stage_layers: layers must be {num_stages} counts >= 0 summing to the model's "
                             f"{num_layers} layers, got {layers!r}")
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def _prune(lm: CausalLM, keep: range, first: bool, last: bool) -> None:
    """Drop every module of ``lm`` that the stage does not run (idempotent for the same stage)."""
    dec = lm.model
    if isinstance(dec.layers, nn.ModuleDict):  # already a stage
        if [int(k) for k in dec.layers.keys()] != list(keep):
            raise ValueError(f"PipelineStage: the model is already split to layers {list(dec.layers.keys())}, not "
                             f"{list(keep)}")
    else:
        dec.layers = nn.ModuleDict({str(i): dec.layers[i] for i in keep})  # names stay model.layers.{i}
    tied = lm.lm_head is not None and lm.lm_head.tied is not None
    if not first and not (last and tied):
        dec.embed_tokens = None
    if not last:
        dec.norm = None
        lm.lm_head = None


class PipelineStage(nn.Module):
    """Stage ``stage`` of ``num_stages`` of ``model`` (a :class:`CausalLM`, parallelized at TP size 1; meta or
    materialized, pruned in place to this stage: see the module docstring). ``max_tokens``: the most tokens (batch x
    new tokens) of a forward call, ``max_batch`` the most sequences :meth:`tokens_to_first` carries; they size the
    send / recv buffers. ``layers``: decoder layers per stage (default :func:`stage_layers`'s). Collective to make
    and to :meth:`close`; defaults: ``stage`` this rank, ``num_stages`` the world size. The stage takes over
    ``model``'s modules (``model.layers`` becomes a ``ModuleDict`` of its layers): call the stage, not ``model``."""

    def __init__(self, model: CausalLM, stage: int | None = None, num_stages: int | None = None, *, max_tokens: int,
                 max_batch: int = 1, layers=None, dtype: torch.dtype | None = None):
        super().__init__()
        what = type(self).__name__
        if not isinstance(model, CausalLM):
            raise TypeError(f"{what}: model must be a CausalLM, got {type(model).__name__}")
        world = triton_dist.current_world()
        num_stages = world.world_size if num_stages is None else num_stages
        stage = world.rank if stage is None else stage
        if num_stages != world.world_size:
            raise ValueError(f"{what}: one stage per rank: num_stages must be the world size {world.world_size}, "
                             f"got {num_stages}")
        if stage != world.rank:
            raise ValueError(f"{what}: stage {stage} runs on rank {stage}, this is rank {world.rank}")
        for name, v in (("max_tokens", max_tokens), ("max_batch", max_batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{what}: {name} must be an int >= 1, got {v!r}")
        par = getattr(model, "par", None) or Parallel()
        if par.world_size != 1:
            raise ValueError(f"{what}: the model is split over {par.world_size} ranks by tensor parallelism; a stage "
                             "is one rank at TP size 1 for now (parallelize with par=Parallel(mode))")
        cfg: ModelConfig = model.config
        self.config, self.mode, self.par = cfg, par.mode, par
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_range = stage_layers(cfg.num_hidden_layers, num_stages, layers)[stage]
        self.max_tokens, self.max_batch = max_tokens, max_batch
        _prune(model, self.layer_range, self.first, self.last)
        self.model = model.model  # children under the checkpoint's names: model.*, lm_head
        self.lm_head = model.lm_head
        if dtype is None:
            dtype = next((p.dtype for p in self.parameters() if p.dtype.is_floating_point), None)
            if dtype is None:
                raise ValueError(f"{what}: stage {stage} holds no weights; give the activations' dtype")
        self.dtype = dtype
        self._act = self._tok = None
        if self.mode != "torch" and num_stages > 1:
            self._act = p2p.P2PContext(max_tokens * cfg.hidden_size, dtype)
            self._tok = p2p.P2PContext(max_batch, torch.int64)

    def new_caches(self, batch: int, max_len: int, *, page_size: int | None = None) -> list[KVCache]:
        """One :class:`KVCache` per layer of this stage, in layer order (zeros)."""
        dev = triton_dist.current_world().device
        return [KVCache(batch, max_len, layer.self_attn.kv_heads, layer.self_attn.head_dim, self.dtype, dev,
                        page_size=page_size) for layer in self.model.layers.values()]

    def forward(self, ids: torch.Tensor | None, step: Step, caches: list[KVCache], all_logits: bool = False):
        """Run this stage for the tokens of ``step`` (``ids`` [B, S]: read by the first stage only). Returns the
        logits (``CausalLM``'s) on the last stage, ``None`` on the others."""
        what = f"{type(self).__name__}.forward"
        if len(caches) != len(self.layer_range):
            raise ValueError(f"{what}: stage {self.stage} runs {len(self.layer_range)} layers, got {len(caches)} "
                             "caches (use new_caches)")
        if step.tokens > self.max_tokens:
            raise ValueError(f"{what}: {step.tokens} tokens, the stage was built for max_tokens = {self.max_tokens}")
        if self.first:
            if ids is None or tuple(ids.shape) != (step.batch, step.seq):
                got = None if ids is None else tuple(ids.shape)
                raise ValueError(f"{what}: the first stage needs the token ids [{step.batch}, {step.seq}], got {got}")
            x = self.model.embed_tokens(ids)
        else:  # the residual stream where the previous stage stopped
            x = self._recv(self.stage - 1, (step.tokens, self.config.hidden_size), self.dtype, self._act)
        residual = None
        with tune.local():  # only this stage runs its layers' kernels: their autotuning must not wait for the others
            for layer, cache in zip(self.model.layers.values(), caches):
                x, residual = layer(x, residual, step, cache)
        if not self.last:
            # one tensor crosses: the residual stream (the next layer's norm input), where the unsplit model's next
            # norm would add the two (the same fp32 / bf16 addition)
            self._send((x if residual is None else residual + x).contiguous(), self.stage + 1, self._act)
            return None
        with tune.local():
            return self.lm_head(self.model.norm.add_norm(x, residual)[0], step, all_logits)

    def tokens_to_first(self, tokens: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The token ids the last stage chose (``tokens`` [batch] there, ignored elsewhere), on stage 0 too: returns
        them on the first and the last stage, ``None`` on the others. Every stage calls it."""
        if self.num_stages == 1 or not (self.first or self.last):
            return tokens if self.num_stages == 1 else None
        if batch > self.max_batch:
            raise ValueError(f"tokens_to_first: batch {batch}, the stage was built for max_batch = {self.max_batch}")
        if self.last:
            if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (batch,):
                got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise ValueError(f"tokens_to_first: the last stage sends token ids [{batch}], got {got}")
            tokens = tokens.to(torch.int64).contiguous()
            self._send(tokens, 0, self._tok)
            return tokens
        return self._recv(self.num_stages - 1, (batch,), torch.int64, self._tok)

    def _send(self, x: torch.Tensor, dst: int, ctx) -> None:
        if ctx is None:
            p2p.send_reference(x, dst)
        else:
            ctx.send(x, dst)

    def _recv(self, src: int, shape, dtype, ctx) -> torch.Tensor:
        if ctx is None:
            return p2p.recv_reference(src, shape=shape, dtype=dtype)
        return ctx.recv(src, shape=shape)

    def close(self) -> None:
        """Free the send / recv buffers (collective: every stage closes)."""
        for ctx in (self._act, self._tok):
            if ctx is not None:
                ctx.close()
        self._act = self._tok = None


def build_stage(cfg: ModelConfig, stage: int | None = None, num_stages: int | None = None, *, mode: str = "torch",
                device=None, dtype=torch.bfloat16, max_tokens: int, max_batch: int = 1, layers=None) -> PipelineStage:
    """This rank's stage of the model of ``cfg`` at TP size 1 in ``mode``, with uninitialised storage on ``device``
    (default: this rank's) for its own layers only; fill it with :func:`~triton_dist.models.loader.load_checkpoint`
    or :func:`~.loader.init_random`. Collective (see :class:`PipelineStage`)."""
    world = triton_dist.current_world()
    num_stages = world.world_size if num_stages is None else num_stages
    stage = world.rank if stage is None else stage
    ranges = stage_layers(cfg.num_hidden_layers, num_stages, layers)
    if not 0 <= stage < num_stages:
        raise ValueError(f"build_stage: stage {stage} is not in [0, {num_stages})")
    lm = CausalLM(cfg, dtype)
    _prune(lm, ranges[stage], stage == 0, stage == num_stages - 1)  # before any storage exists
    parallelize(lm, mode, par=Parallel(mode))
    materialize(lm, world.device if device is None else device, dtype)
    return PipelineStage(lm.eval(), stage, num_stages, max_tokens=max_tokens, max_batch=max_batch, layers=layers,
                         dtype=dtype).eval()
