"""Weights into a model built by :func:`~triton_dist.models.qwen3.build_model`: a directory of safetensors files
(each rank reads only its shards: memory-mapped slices, no full copy), an in-memory Hugging Face state dict, or
random values that do not depend on the split (the same full tensors at every TP size: runs at TP=1 and TP=4 of one
seed compute the same model).

Names are the checkpoints' (``model.layers.0.self_attn.q_proj.weight``; MoE experts per expert,
``model.layers.0.mlp.experts.3.gate_proj.weight``); a state dict of transformers 5's in-memory layout
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) is mapped onto them.
"""
from __future__ import annotations

import glob
import json
import os
import re
import zlib

import torch

from triton_dist.layers import TensorShard, named_tensor_shards

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _copy(name: str, ts: TensorShard, full_shape, get_part) -> None:
    part = get_part(ts.take(full_shape))
    if tuple(part.shape) != tuple(ts.target.shape):
        raise ValueError(f"{name}: the checkpoint's tensor {tuple(full_shape)} gives a part of {tuple(part.shape)} "
                         f"on this rank, the model expects {tuple(ts.target.shape)} (a config that does not match "
                         "the checkpoint?)")
    ts.target.copy_(part)


def checkpoint_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` of a checkpoint directory (``model.safetensors.index.json``'s weight map, or every
    ``*.safetensors`` file's keys)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    out = {}
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            out.update((k, fn) for k in f.keys())
    return out


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Fill every tensor of ``model`` from the safetensors files in ``path``, reading only this rank's part of
    each (``safe_open(...).get_slice``: the file is memory-mapped, the slice read). Raises ValueError naming the
    missing tensors or a shape that does not fit."""
    from safetensors import safe_open
    where = checkpoint_files(path)
    wanted = list(named_tensor_shards(model))
    missing = [n for n, _ in wanted if n not in where]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:4]}")
    handles = {}
    try:
        for name, ts in wanted:
            fn = where[name]
            if fn not in handles:
                handles[fn] = safe_open(fn, framework="pt", device="cpu").__enter__()
            sl = handles[fn].get_slice(name)
            _copy(name, ts, tuple(sl.get_shape()), lambda idx, sl=sl: sl[idx])
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return model


def _from_state_dict(sd: dict, name: str) -> torch.Tensor | None:
    if name in sd:
        return sd[name]
    m = _EXPERT.match(name)
    if m is None:
        return None
    base, j, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind == "down_proj" and f"{base}.down_proj" in sd:
        return sd[f"{base}.down_proj"][j]
    fused = sd.get(f"{base}.gate_up_proj")
    if fused is None:
        return None
    half = fused.shape[1] // 2
    return fused[j, :half] if kind == "gate_proj" else fused[j, half:]


@torch.no_grad()
def load_state_dict(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """Fill ``model`` from a full (unsplit) Hugging Face state dict, this rank's part of each tensor."""
    for name, ts in named_tensor_shards(model):
        t = _from_state_dict(state_dict, name)
        if t is None:
            raise ValueError(f"the state dict has no {name!r} (nor a transformers-5 fused expert tensor for it)")
        _copy(name, ts, tuple(t.shape), lambda idx, t=t: t[idx])
    return model


def _full_shape(ts: TensorShard) -> tuple[int, ...]:
    shape = list(ts.target.shape)
    if ts.dim is not None:
        shape[ts.dim] *= ts.parts
    return tuple(shape)


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random weights, the same full tensors whatever the split: each tensor from its own generator (seeded by its
    name), drawn at full size on the device and this rank's part kept. Norm weights ``1 + N(0, std)``, everything
    else ``N(0, std)``."""
    for name, ts in named_tensor_shards(model):
        dev = ts.target.device
        g = torch.Generator(device=dev).manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
        full = torch.randn(_full_shape(ts), generator=g, device=dev, dtype=torch.float32) * std
        if name.endswith("norm.weight"):
            full += 1.0
        _copy(name, ts, full.shape, lambda idx, full=full: full[idx])
    return model


def save_checkpoint(state_dict: dict, path: str, config: dict) -> None:
    """Write ``state_dict`` (full tensors, checkpoint names) and ``config`` as an HF-style directory: one
    ``model.safetensors`` and ``config.json`` (tests and examples)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
