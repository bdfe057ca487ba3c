"""``triton-dist generate``: prefill and decode a model on N ranks in one or more tensor-parallel modes, timed, with
a short table on rank 0.

::

    triton-dist generate --model qwen3-8b --tp 8 --mode all --batch 8 --prompt-len 512 --gen-len 64
    triton-dist generate --model /ckpt/Qwen3-8B --tp 2 --mode torch,ag_rs --prompt "The capital of France is"
    triton-dist generate --model tiny --tp 2 --world cpu --mode torch,ag_rs --gen-len 4     # the CPU world
    triton-dist run -n 2 --mode cpu -m triton_dist.models.generate --model tiny ...       # the same, by hand

Options read by ``triton-dist generate`` itself (the launcher): ``--tp N`` (alias ``-n``: the number of ranks, which
is the tensor-parallel degree), ``--world auto|gpu|cpu`` (what ``--mode`` is for ``triton-dist run``: GPUs through
torchrun, or the CPU world), ``--timeout``, ``--share-gpus``, ``--no-mps``. Here ``--mode`` names the model's
tensor-parallel mode(s) (:data:`triton_dist.layers.MODES`, a comma list, or ``all``), as the issue's syntax has it.
Everything else is this module's (:func:`build_parser`):

``--model``: a preset (``qwen3-8b``, ``qwen3-32b``, ``qwen3-30b-a3b``, ``llama3-8b``: random weights, no download;
``tiny`` / ``tiny-moe``: 2-layer shapes for the CPU world, defined here), or a directory with ``config.json`` and
safetensors files (loaded, each rank reading its shards; ``--random-weights``: only the config). ``--layers L``
keeps the first ``L`` decoder layers (quick runs). The prompts are random ids (``--seed``), all of ``--prompt-len``
tokens, unless ``--prompt TEXT`` is given and the directory holds ``tokenizer.json`` (read with the ``tokenizers``
package): then every sequence of the batch is that text, and the generated text is printed too.

Each mode builds its model (weights from the same seed, or the checkpoint), runs ``--warmup`` short generations
(compilation, autotuning, CUDA-graph capture; default 1 on GPUs, 0 in the CPU world), then one timed generation.
The table: mode, prefill ms, median and p90 decode step ms (the slowest rank's), tokens/s (``batch * 1000 /
median step ms``), whether the decode steps were CUDA-graph replays, and whether the tokens equal the first mode's
(``no (from step k)``: the first step where a sequence differs; in bf16 the modes' logits differ by rounding, so a
near-tie can flip a greedy choice). ``--dtype``: bf16 on GPUs and fp32 in the CPU world by default (Triton's
interpreter computes bf16 only approximately).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from triton_dist._argtypes import positive_int

from .config import PRESETS, ModelConfig, resolve

# Shapes for the CPU world (our attention kernels take head dims 64 / 128 / 256), not checkpoints.
TINY = {
    "tiny": ModelConfig("qwen3", 96, 64, 96, 2, 4, 2, 64, max_position_embeddings=512, eos_token_id=1),
    "tiny-moe": ModelConfig("qwen3_moe", 96, 64, 96, 2, 4, 2, 64, max_position_embeddings=512, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(1,), eos_token_id=1),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_model(name: str, layers: int | None = None) -> tuple[ModelConfig, str | None]:
    """``(config, checkpoint directory or None)`` of ``--model`` (a preset of :data:`TINY` or
    :data:`~triton_dist.models.config.PRESETS`, or a directory), with only the first ``layers`` decoder layers."""
    if name in TINY:
        cfg, path = TINY[name], None
    else:
        try:
            cfg, path = resolve(name)
        except ValueError:
            raise ValueError(f"--model {name!r} is neither a preset ({', '.join(list(TINY) + list(PRESETS))}) nor a "
                             "directory with a config.json") from None
    if layers is not None:
        if not 1 <= layers:
            raise ValueError(f"--layers must be positive, got {layers}")
        cfg = dataclasses.replace(cfg, num_hidden_layers=min(layers, cfg.num_hidden_layers))
    return cfg, path


def parse_modes(text: str) -> list[str]:
    """``torch,ag_rs`` or ``all`` -> the modes, in order, without repeats."""
    from triton_dist.layers import MODES
    if text.strip() == "all":
        return list(MODES)
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        hint = " (the world is --world cpu|gpu)" if set(bad) & {"cpu", "gpu", "auto"} else ""
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma list of {','.join(MODES)}, got {text!r}{hint}")
    return modes


def heap_bytes_for(cfg: ModelConfig, tokens: int, world_size: int) -> int:
    """Symmetric heap per rank for our ops' contexts at ``tokens`` tokens per call (a prefill's ``batch *
    prompt_len``): the largest stagings (gemm_ar's ``world`` fp32 slots, gemm_rs's fp32 partials, ag_gemm's gathered
    rows) of the two projections of each kind, in powers of two, plus 256 MiB; at least 4 GiB."""
    rows = 1 << max(4, (max(tokens, 1) - 1).bit_length())
    need = 2 * (world_size + 2) * rows * cfg.hidden_size * 4 + (256 << 20)
    return max(4 << 30, need)


def random_prompts(batch: int, length: int, vocab: int, seed: int):
    """Token ids [batch, length] drawn uniformly from the vocabulary (CPU; the same on every rank)."""
    import torch
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_tokenizer(path: str | None):
    """``tokenizers.Tokenizer`` of ``path/tokenizer.json``, or None (no directory, no file, no package)."""
    if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


def first_difference(a, b) -> int | None:
    """The first step (column) where token tables ``a`` and ``b`` [B, n] differ; None when equal."""
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    if diff.numel():
        return int(diff[0])
    return None if a.shape == b.shape else n


def format_table(rows: list[dict], header: str, notes: list[str] = ()) -> str:
    """The table ``generate`` prints: one line per mode (``rows``: mode, prefill_ms, median_ms, p90_ms, batch,
    graphed, match)."""
    lines = [header, f"{'mode':<10} {'prefill ms':>11} {'step ms':>9} {'p90 ms':>9} {'tokens/s':>10} {'graphs':>6}  "
             f"same tokens as {rows[0]['mode'] if rows else '-'}"]
    for r in rows:
        tps = r["batch"] * 1000.0 / r["median_ms"] if r["median_ms"] > 0 else float("nan")
        lines.append(f"{r['mode']:<10} {r['prefill_ms']:>11.2f} {r['median_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{tps:>10.1f} {'yes' if r['graphed'] else 'no':>6}  {r['match']}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The options of ``triton-dist generate`` after the launcher's (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="triton-dist generate", allow_abbrev=False,
                                 description="Prefill and decode a model on N ranks in one or more tensor-parallel "
                                             "modes, timed; a table on rank 0. The launcher's options (--tp, --world, "
                                             "...) are triton-dist generate's; see triton_dist.models.generate.")
    ap.add_argument("--model", required=True,
                    help=f"a preset ({', '.join(list(TINY) + list(PRESETS))}) or a checkpoint directory")
    ap.add_argument("--random-weights", action="store_true",
                    help="with a directory: random weights of its config, no loading (presets: always random)")
    ap.add_argument("--mode", type=parse_modes, default=None,
                    help="the model's tensor-parallel mode(s): a comma list of torch,ag_rs,allreduce,gemm_ar or "
                         "'all' [default: all]")
    ap.add_argument("--batch", type=positive_int, default=1, help="sequences [default: 1]")
    ap.add_argument("--prompt-len", type=positive_int, default=128, help="tokens per random prompt [default: 128]")
    ap.add_argument("--gen-len", type=positive_int, default=32, help="new tokens per sequence [default: 32]")
    ap.add_argument("--prompt", default=None, help="prompt text (needs tokenizer.json in the checkpoint directory)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="[default: bf16; CPU world: fp32]")
    ap.add_argument("--page-size", type=positive_int, default=None, help="paged KV cache of pages of N tokens")
    ap.add_argument("--max-len", type=positive_int, default=None,
                    help="KV cache length [default: prompt + gen-len - 1, rounded up to the page size]")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    ap.add_argument("--sampling", choices=("greedy", "top_p"), default="greedy", help="[default: greedy]")
    ap.add_argument("--top-p", type=_fraction, default=0.9, help="nucleus mass of top_p sampling [default: 0.9]")
    ap.add_argument("--temperature", type=float, default=1.0, help="of top_p sampling [default: 1.0]")
    ap.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling [default: 0]")
    ap.add_argument("--layers", type=positive_int, default=None, help="keep the first L decoder layers (quick runs)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed short generations per mode first [default: 1 on GPUs, 0 in the CPU world]")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop when every sequence produced eos")
    return ap


def _max_len(args, prompt_len: int) -> int:
    n = args.max_len or prompt_len + args.gen_len - 1
    if args.page_size:
        n = -(-n // args.page_size) * args.page_size
    return n


def slowest(values: list[float], group) -> list[float]:
    """Each value's maximum over the ranks."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1 and t.numel():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def ranks_agree(tokens, group) -> bool:
    """Whether every rank holds rank 0's ``tokens`` (collective)."""
    import torch
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return True
    ref = tokens.clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    same = torch.tensor([int(torch.equal(ref, tokens))], dtype=torch.int32)
    dist.all_reduce(same, op=dist.ReduceOp.MIN, group=group)
    return bool(same.item())


def release(world) -> None:
    """Free what a mode's run left: the ops' contexts (collective) and the allocator's cache."""
    import torch
    from triton_dist.layers import release_contexts
    release_contexts()  # the ops' contexts and the EP contexts of the MoE layers
    if world.device.type == "cuda":
        torch.cuda.empty_cache()


def build(cfg: ModelConfig, mode: str, world, dtype, ckpt: str | None, seed: int):
    """The model of ``cfg`` in ``mode`` on this rank's device, from ``ckpt`` or random (``seed``)."""
    from . import loader
    from .qwen3 import build_model
    model = build_model(cfg, mode=mode, device=world.device, dtype=dtype)
    if ckpt:
        loader.load_checkpoint(model, ckpt)
    else:
        loader.init_random(model, seed)
    return model


def main(argv=None) -> None:
    """Run ``triton-dist generate`` on this rank (see the module docstring)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    modes = args.mode or parse_modes("all")
    try:
        cfg, path = resolve_model(args.model, args.layers)
    except ValueError as e:
        ap.error(str(e))
    ckpt = None if args.random_weights else path
    tokenizer = load_tokenizer(path)
    if args.prompt is not None and tokenizer is None:
        ap.error("--prompt needs a checkpoint directory with tokenizer.json and the tokenizers package "
                 f"(--model {args.model!r} has {'no directory' if path is None else 'no usable tokenizer.json'})")
    if not args.temperature > 0:
        ap.error(f"--temperature must be positive, got {args.temperature}")
    import torch

    import triton_dist
    from .engine import Engine, quantile
    if args.prompt is not None:
        ids = torch.tensor(tokenizer.encode(args.prompt).ids, dtype=torch.int64)
        if not ids.numel():
            ap.error("--prompt encodes to no tokens")
        prompts = ids[None].expand(args.batch, -1).contiguous()
    else:
        prompts = random_prompts(args.batch, args.prompt_len, cfg.vocab_size, args.seed)
    P = prompts.shape[1]
    heap = None
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and \
            not os.environ.get("TRITON_DIST_HEAP_SIZE") and \
            os.environ.get("TRITON_DIST_BACKEND", "auto").lower() in ("auto", "cuda"):
        heap = heap_bytes_for(cfg, args.batch * P, int(os.environ.get("WORLD_SIZE", "1")))
    world = triton_dist.init(heap_size=heap)
    dtype = getattr(torch, DTYPES[args.dtype or ("fp32" if world.interpreted else "bf16")])
    warmup = args.warmup if args.warmup is not None else (0 if world.interpreted else 1)
    max_len = _max_len(args, P)
    gen = dict(sampling=args.sampling, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
               stop_at_eos=args.stop_at_eos)
    rows, notes, first_tokens, texts = [], [], None, []
    for mode in modes:
        model = build(cfg, mode, world, dtype, ckpt, args.seed)
        engine = Engine(model, max_batch=args.batch, max_len=max_len, page_size=args.page_size,
                        cuda_graphs=not args.no_graphs)
        for _ in range(max(warmup, 0)):
            engine.generate(prompts, min(args.gen_len, 4), **gen)
        world.barrier()
        res = engine.generate(prompts, args.gen_len, **gen)
        times = slowest([res.prefill_ms] + res.step_ms, world.group)
        if not ranks_agree(res.tokens, world.group):
            notes.append(f"{mode}: the ranks generated different tokens")
        if first_tokens is None:
            first_tokens, match = res.tokens, "-"
        else:
            k = first_difference(first_tokens, res.tokens)
            match = "yes" if k is None else f"no (from step {k})"
        rows.append(dict(mode=mode, prefill_ms=times[0], median_ms=quantile(times[1:], 0.5),
                         p90_ms=quantile(times[1:], 0.9), batch=args.batch, graphed=res.graphed, match=match))
        notes.extend(f"{mode}: {n}" for n in engine.notes)
        if tokenizer is not None and args.prompt is not None:
            texts.append(f"{mode}: {args.prompt!r} -> {tokenizer.decode(res.tokens[0].tolist())!r}")
        del engine, model
        release(world)
    if world.rank == 0:
        weights = "random weights" if ckpt is None else "checkpoint"
        header = (f"generate: {args.model} ({cfg.num_hidden_layers} layers, {weights}), tp {world.world_size}, "
                  f"batch {args.batch}, prompt {P}, gen {args.gen_len}, {str(dtype).replace('torch.', '')}, "
                  f"{args.sampling}, {'CPU world' if world.interpreted else 'GPU'}")
        if world.interpreted:
            notes.append("CPU world: wall-clock times of interpreted kernels, not performance")
        print(format_table(rows, header, notes))
        for t in texts:
            print(t)
        sys.stdout.flush()
    triton_dist.finalize()


if __name__ == "__main__":
    main()
