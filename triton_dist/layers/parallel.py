"""Tensor-parallel plumbing of the layers: the modes, how a full (Hugging Face) tensor maps onto this rank's shard,
and the column / row parallel linear layers.

Modes (``mode=``; every mode gives the same result within bf16 tolerance):

* ``torch``: the baseline. Activations replicated on every rank, ``torch.nn.functional.linear`` and
  ``torch.distributed.all_reduce`` (NCCL on GPUs, gloo in the CPU world) after each row-parallel layer.
* ``allreduce``: the same layout, our :func:`triton_dist.ops.all_reduce` after each row-parallel layer, our decode
  GEMM for the few-row projections.
* ``gemm_ar``: the row-parallel layers are :func:`triton_dist.ops.gemm_ar` (the all-reduce fused into the GEMM).
* ``ag_rs``: sequence-sharded activations: each rank holds ``1 / world`` of the tokens between the blocks; column
  layers are :func:`triton_dist.ops.ag_gemm` (the tokens all-gathered while the GEMM runs), row layers
  :func:`triton_dist.ops.gemm_rs` (the GEMM's partials reduce-scattered back to the token shards). The token count
  must be a multiple of the world size (the engine pads the batch).

Shards. A layer is built at its full (single-device) shape; :meth:`ParallelLayer.shard` gives it this rank's shapes.
Each layer lists, for every checkpoint tensor it holds, a :class:`TensorShard`: the checkpoint name (relative to the
layer), the local tensor it fills, and which part of the full tensor that is (``dim``, ``index`` of ``parts`` equal
chunks: column layers split the output rows, row layers the input columns). The weight loader
(:mod:`triton_dist.models.loader`) reads only those parts (memory-mapped safetensors slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import triton_dist

from . import _calls

MODES = ("torch", "ag_rs", "allreduce", "gemm_ar")
SEQUENCE_SHARDED = ("ag_rs",)  # modes whose activations are split over the ranks by token


def check_mode(what: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{what}: mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class TensorShard:
    """One checkpoint tensor's part on this rank: ``name`` (relative to its layer, e.g. ``q_proj.weight``), the
    local ``target`` to copy it into (a view of the layer's storage), and the part: chunk ``index`` of ``parts``
    equal chunks along ``dim`` (``dim`` None: the whole tensor, replicated)."""

    name: str
    target: torch.Tensor
    dim: int | None = None
    index: int = 0
    parts: int = 1

    def take(self, full_shape) -> tuple[slice, ...]:
        """The index of this part in a tensor of ``full_shape`` (checks that it divides evenly)."""
        if self.dim is None:
            return tuple(slice(None) for _ in full_shape)
        size = full_shape[self.dim]
        if size % self.parts:
            raise ValueError(f"{self.name}: dimension {self.dim} of {tuple(full_shape)} does not split into "
                             f"{self.parts} equal parts")
        step = size // self.parts
        idx = [slice(None)] * len(full_shape)
        idx[self.dim] = slice(self.index * step, (self.index + 1) * step)
        return tuple(idx)


@dataclass
class Parallel:
    """How a layer is split: ``mode``, this rank and the world size (1: a single device), and the process group of
    the ``torch`` mode's collectives."""

    mode: str = "torch"
    rank: int = 0
    world_size: int = 1
    group: object = None

    @classmethod
    def current(cls, mode: str) -> "Parallel":
        """The split over the current world (``triton_dist.init()``), or a single device without one."""
        check_mode("Parallel", mode)
        if not triton_dist.is_initialized():
            return cls(mode)
        w = triton_dist.current_world()
        return cls(mode, w.rank, w.world_size, w.group)

    @property
    def sequence_sharded(self) -> bool:
        return self.world_size > 1 and self.mode in SEQUENCE_SHARDED

    def split(self, n: int, what: str) -> int:
        """``n / world_size``, which must be whole."""
        if n % self.world_size:
            raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {self.world_size}")
        return n // self.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``x`` (``torch``: torch.distributed; else ours)."""
        if self.world_size == 1:
            return x
        if self.mode == "torch":
            dist.all_reduce(x, group=self.group)
            return x
        return _calls.all_reduce(x)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` stacked along dim 0."""
        if self.world_size == 1:
            return x
        if self.mode == "torch":
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return torch.cat(parts)
        return _calls.all_gather(x.contiguous())


class ParallelLayer(nn.Module):
    """A layer that can be split over ranks. Life cycle: built at full size on the ``meta`` device (no memory),
    :meth:`shard` (this rank's shapes), :meth:`materialize` (storage on the device), then the loader fills
    :meth:`tensor_shards` (or random weights do). ``shard`` and ``materialize`` act on this layer's own tensors, not
    its children's (:func:`triton_dist.layers.parallelize` walks the tree)."""

    par: Parallel = Parallel()

    def shard(self, par: Parallel) -> None:
        """Give this layer this rank's shapes and mode. The default records ``par`` (replicated tensors)."""
        self.par = par

    def materialize(self, device, dtype) -> None:
        """Allocate this layer's own parameters and buffers on ``device`` (floating ones in ``dtype``), uninitialised."""
        for name, p in list(self._parameters.items()):
            if p is not None:
                self._parameters[name] = nn.Parameter(_empty(p.shape, p.dtype, device, dtype), requires_grad=False)
        for name, b in list(self._buffers.items()):
            if b is not None:
                self._buffers[name] = _empty(b.shape, b.dtype, device, dtype)

    def tensor_shards(self) -> list[TensorShard]:
        """This layer's checkpoint tensors (names relative to it), each with its local target and part. The default:
        every parameter whole (replicated)."""
        return [TensorShard(name, p) for name, p in self._parameters.items() if p is not None]


def _empty(shape, kind, device, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype if kind.is_floating_point else kind, device=device)


def _param(shape, dtype=None, device="meta") -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def local_linear(x: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    """``x @ w.t()`` on this rank: torch's in the ``torch`` mode and for many rows; our decode GEMM (weights read
    once, split K) for a few rows on a GPU otherwise."""
    from triton_dist.kernels import decode_gemm as _dg
    if mode != "torch" and x.is_cuda and 1 <= x.shape[0] <= _dg.MAX_M and x.is_contiguous():
        return _calls.decode_gemm(x, w.t())
    return F.linear(x, w)


@dataclass(frozen=True)
class Segment:
    """Part of a column layer's output rows: ``size`` rows at full size, ``name`` its checkpoint tensor (e.g.
    ``q_proj``; None: the layer's own ``weight``). ``replicate_below``: when the segment splits into fewer than
    ``world`` chunks of ``replicate_below`` rows (grouped KV heads at a large TP), each rank takes the chunk of its
    group of ranks instead."""

    size: int
    name: str | None = None
    replicate_below: int | None = None

    def part(self, par: Parallel) -> tuple[int, int]:
        """(index, parts) of this rank's chunk."""
        w = par.world_size
        if self.replicate_below and self.size // self.replicate_below < w:
            heads = self.size // self.replicate_below
            if w % heads:
                raise ValueError(f"{self.name}: {heads} heads cannot be shared by {w} ranks (need a divisor)")
            return par.rank // (w // heads), heads
        if self.size % w:
            raise ValueError(f"{self.name or 'a column-parallel output'} of {self.size} rows is not divisible by the "
                             f"tensor-parallel size {w}")
        return par.rank, w


class WeightView(ParallelLayer):
    """A checkpoint name for rows of a fused column layer: ``weight`` is a view of the fused storage (set by the
    owner), so ``state_dict`` / ``load_state_dict`` use the stock names while the GEMM reads one fused matrix."""

    def __init__(self, shape, dtype=None):
        super().__init__()
        self.weight = _param(shape, dtype)

    def materialize(self, device, dtype) -> None:  # the owner sets the view
        pass

    def tensor_shards(self) -> list[TensorShard]:
        return []  # the owner lists its segments


class ColumnParallelLinear(ParallelLayer):
    """``y = x @ weight.t()`` with ``weight`` [out, in] (``nn.Linear``'s layout, no bias), split by output rows.

    ``segments``: parts of the output split separately, each rank taking its chunk of every segment, in order (a
    fused q | k | v or gate | up). Named segments are stored fused in one matrix (a non-persistent buffer) and exposed
    as ``parts`` (:class:`WeightView` modules the owner registers under the stock names, e.g. ``q_proj``); an unnamed
    single segment is this layer's own ``weight``. ``ag_rs``: ``x`` is this rank's token shard and the result covers
    every rank's tokens (:func:`triton_dist.ops.ag_gemm`)."""

    def __init__(self, in_features: int, out_features: int | None = None, *, segments=None, dtype=None):
        super().__init__()
        self.segments = tuple(segments) if segments else (Segment(out_features),)
        self.in_features = in_features
        self.out_features = sum(s.size for s in self.segments)
        self.fused = any(s.name for s in self.segments)
        self._local = [s.size for s in self.segments]
        if self.fused:
            self.register_buffer("weight", torch.empty((self.out_features, in_features), dtype=dtype, device="meta"),
                                 persistent=False)
            self.parts = [WeightView((s.size, in_features), dtype) for s in self.segments]
        else:
            self.weight = _param((self.out_features, in_features), dtype)

    def shard(self, par: Parallel) -> None:
        super().shard(par)
        self._local = []
        for s in self.segments:
            _, parts = s.part(par)
            self._local.append(s.size // parts)
        shape = (sum(self._local), self.in_features)
        if self.fused:
            self.weight = torch.empty(shape, dtype=self.weight.dtype, device="meta")
            for v, n in zip(self.parts, self._local):
                v.weight = _param((n, self.in_features), v.weight.dtype)
        else:
            self.weight = _param(shape, self.weight.dtype)

    def materialize(self, device, dtype) -> None:
        super().materialize(device, dtype)
        if self.fused:
            for v, view in zip(self.parts, self.segment_views()):
                v.weight = nn.Parameter(view, requires_grad=False)

    def segment_views(self) -> list[torch.Tensor]:
        """The weight's rows of each segment (views of the fused storage)."""
        return list(torch.split(self.weight, self._local, dim=0))

    def tensor_shards(self) -> list[TensorShard]:
        out = []
        for s, view in zip(self.segments, self.segment_views()):
            index, parts = s.part(self.par)
            # fused: named relative to the owner (the parts are registered there); the loader resolves "../"
            name = f"../{s.name}.weight" if s.name else "weight"
            out.append(TensorShard(name, view, 0, index, parts))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.par.sequence_sharded:
            return _calls.ag_gemm(x.contiguous(), self.weight.t())
        return local_linear(x, self.weight, self.par.mode)


class RowParallelLinear(ParallelLayer):
    """``y = x @ weight.t()`` with ``weight`` [out, in] split by input columns: each rank multiplies its columns of
    ``x`` and the partial sums are added over ranks, by mode: torch's or our all-reduce,
    :func:`triton_dist.ops.gemm_ar`, or :func:`triton_dist.ops.gemm_rs` back to the token shards (``ag_rs``)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), dtype)

    def shard(self, par: Parallel) -> None:
        super().shard(par)
        self.weight = _param((self.out_features, par.split(self.in_features, "a row-parallel input size")),
                             self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        par = self.par
        if par.world_size == 1:
            return local_linear(x, self.weight, par.mode)
        if par.mode == "ag_rs":
            return _calls.gemm_rs(x.contiguous(), self.weight.t())
        if par.mode == "gemm_ar":
            return _calls.gemm_ar(x.contiguous(), self.weight.t())
        return par.all_reduce(local_linear(x, self.weight, par.mode))

    def tensor_shards(self) -> list[TensorShard]:
        return [TensorShard("weight", self.weight, 1, self.par.rank, self.par.world_size)]
