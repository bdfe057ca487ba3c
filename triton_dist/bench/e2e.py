"""End-to-end decode and prefill of a model, our tensor-parallel modes against torch's: ``triton-dist bench e2e``.

::

    triton-dist bench e2e -n 8 [--model qwen3-8b] [--modes torch,allreduce,gemm_ar,ag_rs] [--batch 1,8]
                               [--context 512] [--gen-len 32] [--layers L] [--page-size N] [--repeats 3]
                               [--out DIR] [--plot PATH | --no-plot]
    triton-dist bench e2e -n 2 --mode cpu -- --smoke [--modes torch,ag_rs]   # CPU world: a plumbing check
    python -m triton_dist.bench.e2e --render bench/results/h200.jsonl [--run-id ID]   # no GPU needed

For each mode (the model built once per mode, random weights from one seed, or ``--model DIR``'s checkpoint) and
each batch and context (the prompt length), the :class:`~triton_dist.models.engine.Engine` runs ``--warmup`` short
generations (compilation, autotuning, CUDA-graph capture), then ``--repeats`` timed ones after a barrier: greedy, a
prefill of the context then ``--gen-len - 1`` decode steps, KV cache of ``context + gen-len - 1`` tokens. Providers:
``torch_graph`` for the ``torch`` mode (the baseline: the same engine and CUDA-graph decode, torch's GEMMs, SDPA and
NCCL) and ``triton_dist:<mode>`` for ours; the torch mode always runs (first) since every ratio needs it.

Rows go to ``<out>/<card>.jsonl``: op ``e2e_decode`` (the samples are the decode steps of every repeat, each the
slowest rank's: median, p20, p80 in us; ``gbps`` the rank's weight bytes over the median step, the decode floor's
measure, MoE counting every expert) and ``e2e_prefill`` (one sample per repeat: the prompt's forward plus the first
token's sampling), shape ``model=<name>,batch=<B>,context=<P>,tp=<world>``. The tables give ours / torch_graph time
per case (goal <= 1), with tokens/s; the plot draws those ratios. Whether each mode's greedy tokens equal the torch
mode's is noted (in bf16 a near-tie can differ). In a shared-GPU world the rows are marked ``shared_gpu`` (not
performance).
"""
from __future__ import annotations

import argparse
import os

from .cores import CheckedBench
from .gemm import DTYPE_NAMES, _choices, _int_list
from .harness import agree, first_line
from .report import (Progress, add_render_args, announce_shared_gpu, card_plot_path, format_pair_tables, load_runs,
                     plot_pairs, render_recorded, world_caveats)

OPS = ("e2e_decode", "e2e_prefill")
BASELINE = "torch_graph"
GOAL = {"e2e_decode": 1.0, "e2e_prefill": 1.0}  # ours / baseline time at most
DEFAULT_PLOT = os.path.join("docs", "perf", "e2e_{card}.png")
MODES = ("torch", "ag_rs", "allreduce", "gemm_ar")  # triton_dist.layers.MODES, without importing torch here
SMOKE = dict(model="tiny", batch=[1], context=[5], gen_len=3)


def provider(mode: str) -> str:
    """``torch_graph`` for the torch mode, ``triton_dist:<mode>`` for ours."""
    return BASELINE if mode == "torch" else f"triton_dist:{mode}"


def shape(model: str, batch: int, context: int, tp: int) -> str:
    return f"model={model},batch={batch},context={context},tp={tp}"


def parse_shape(text: str) -> dict:
    """``model=qwen3-8b,batch=8,...`` -> ``{"model": "qwen3-8b", "batch": "8", ...}``."""
    return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)


# ---------------------------------------------------------------------------------------------- report
def e2e_pairs(rows: list[dict]) -> dict:
    """``{op: {label: (ours_us, baseline_us, our_row)}}``: each of our modes against ``torch_graph`` of the same
    shape (label: the shape and ``[mode]``); a later row of the same (op, shape, provider) replaces an earlier one."""
    cells: dict = {}
    for r in rows:
        if r.get("op") in OPS:
            cells.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    out: dict = {}
    for (op, shp), c in cells.items():
        if BASELINE not in c:
            continue
        for prov, r in c.items():
            if prov.startswith("triton_dist:"):
                out.setdefault(op, {})[f"{shp} [{prov.split(':', 1)[1]}]"] = (r["median_us"], c[BASELINE]["median_us"],
                                                                             r)
    return {op: out[op] for op in OPS if op in out}


def load_e2e_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The end-to-end rows of a ``<card>.jsonl``, of the runs ``run_id`` (one id or a comma list; default all)."""
    rows = load_runs(path, lambda r: r.get("op") in OPS, run_id)
    if not e2e_pairs(rows):
        raise ValueError(f"{path} holds no end-to-end rows" + (f" of run(s) {run_id}" if run_id else ""))
    return rows


def _rate(op: str, r: dict) -> str:
    s = parse_shape(r["shape"])
    tokens = int(s.get("batch", 1)) * (1 if op == "e2e_decode" else int(s.get("context", 1)))
    return f"  {tokens * 1e6 / r['median_us']:10.1f} tok/s"


def format_e2e_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """Per op: each case's time (ours, torch_graph's), the ratio, tokens/s, whether it meets the goal."""
    return format_pair_tables(e2e_pairs(rows), GOAL, lambda op: BASELINE, _rate, 52, notes)


def default_plot_path(card: str) -> str:
    """``docs/perf/e2e_<card>.png``."""
    return card_plot_path(DEFAULT_PLOT, card)


def plot_e2e_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """One panel per op: ours / torch_graph time per case, the goal as a line. PNG at ``path``, or None (a printed
    note) without matplotlib or rows."""
    return plot_pairs(e2e_pairs(rows), rows, path, GOAL, lambda op: BASELINE, "end-to-end decode / prefill", title)


# ---------------------------------------------------------------------------------------------- the bench
class _E2EBench(CheckedBench):
    def mode(self, mode: str, cfg, name: str, ckpt, batches, contexts, reference: dict) -> None:
        """Every (context, batch) case of one mode: one model, one engine (caches for the largest case)."""
        import torch.distributed as dist

        from triton_dist.models import generate as G
        from triton_dist.models.engine import Engine
        a, w = self.args, self.world
        prov = provider(mode)
        engine = err = None
        try:
            model = G.build(cfg, mode, w, self.dtype, ckpt, a.seed)
            max_len = max(contexts) + a.gen_len - 1
            if a.page_size:
                max_len = -(-max_len // a.page_size) * a.page_size
            engine = Engine(model, max_batch=max(batches), max_len=max_len, page_size=a.page_size,
                            cuda_graphs=not a.no_graphs)
        except Exception as e:  # noqa: BLE001  (noted; the other modes still run)
            err = first_line(e)
        failed = agree(err, w.group)
        if failed:
            self.note(f"{prov}: not run: {'; '.join(failed)}")
            if mode != "torch":
                self.failures.append(prov)
            self.steps += 2 * len(batches) * len(contexts)
            return
        weight_bytes = cfg.weight_bytes(self.elem) / w.world_size
        for ctx in contexts:
            for b in batches:
                shp = shape(name, b, ctx, w.world_size)
                self.steps += 1
                self.progress.update(self.steps, f"{shp} {prov}")
                ids = G.random_prompts(b, ctx, cfg.vocab_size, a.seed + 7919 * b + ctx)
                err, res, pre, steps = None, None, [], []
                try:
                    for _ in range(a.warmup):
                        engine.generate(ids, min(a.gen_len, 4))
                    for _ in range(a.repeats):
                        dist.barrier(group=w.group)
                        res = engine.generate(ids, a.gen_len)
                        pre.append(res.prefill_ms * 1e3)
                        steps.extend(s * 1e3 for s in res.step_ms)
                except Exception as e:  # noqa: BLE001
                    err = first_line(e)
                failed = agree(err, w.group)
                self.steps += 1
                if failed:
                    self.note(f"{shp} {prov}: not timed: {'; '.join(failed)}")
                    if mode != "torch":
                        self.failures.append(f"{shp} {prov}")
                    continue
                dt = str(self.dtype).replace("torch.", "")
                if steps:
                    self.rec.add("e2e_decode", shp, dt, prov, G.slowest(steps, w.group), nbytes=weight_bytes)
                self.rec.add("e2e_prefill", shp, dt, prov, G.slowest(pre, w.group))
                if self.gpu and a.gen_len > 1 and not res.graphed and not a.no_graphs:
                    self.note(f"{shp} {prov}: decode steps ran eagerly (CUDA-graph capture failed)")
                if not G.ranks_agree(res.tokens, w.group):
                    self.note(f"{shp} {prov}: the ranks generated different tokens")
                    self.failures.append(f"{shp} {prov}")
                if mode == "torch":
                    reference[shp] = res.tokens
                elif shp in reference:
                    k = G.first_difference(reference[shp], res.tokens)
                    if k is not None:
                        self.note(f"{shp} {prov}: greedy tokens differ from torch_graph's from step {k}")
        self.notes.extend(f"{prov}: {n}" for n in engine.notes)
        del engine, model
        G.release(w)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``triton-dist bench e2e``."""
    ap = argparse.ArgumentParser(prog="triton-dist bench e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of <card>.jsonl [default: bench/results; --smoke: none]")
    ap.add_argument("--model", default=None,
                    help="a preset (qwen3-8b, qwen3-32b, qwen3-30b-a3b, llama3-8b, tiny, tiny-moe) or a checkpoint "
                         "directory [default: qwen3-8b; --smoke: tiny]")
    ap.add_argument("--random-weights", action="store_true", help="with a directory: its config, random weights")
    ap.add_argument("--modes", type=_choices(MODES), default=list(MODES),
                    help="comma-separated subset of " + ",".join(MODES) + " (torch always runs) [default: all]")
    ap.add_argument("--batch", type=_int_list, default=None, help="batch sizes [default: 1,8; --smoke: 1]")
    ap.add_argument("--context", type=_int_list, default=None, help="prompt lengths [default: 512; --smoke: 5]")
    ap.add_argument("--gen-len", type=int, default=None, help="tokens per generation [default: 32; --smoke: 3]")
    ap.add_argument("--layers", type=int, default=None, help="keep the first L decoder layers")
    ap.add_argument("--page-size", type=int, default=None, help="paged KV cache of pages of N tokens")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs) for every mode")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per case [default: 3; --smoke: 1]")
    ap.add_argument("--warmup", type=int, default=None, help="untimed generations per case first [default: 1; "
                                                             "--smoke: 0]")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts [default: 0]")
    ap.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None, help="[default: bf16; --smoke: fp32]")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model, allowed in the CPU world (wall-clock timing): checks the plumbing only")
    add_render_args(ap, DEFAULT_PLOT.format(card="<card>"))
    return ap


def _defaults(ap, args) -> None:
    smoke = args.smoke
    args.model = args.model or ("tiny" if smoke else "qwen3-8b")
    args.batch = args.batch or (SMOKE["batch"] if smoke else [1, 8])
    args.context = args.context or (SMOKE["context"] if smoke else [512])
    args.gen_len = args.gen_len if args.gen_len is not None else (SMOKE["gen_len"] if smoke else 32)
    args.repeats = args.repeats if args.repeats is not None else (1 if smoke else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if smoke else 1)
    args.dtype = args.dtype or ("fp32" if smoke else "bf16")
    args.samples = args.repeats  # CheckedBench's name
    if args.gen_len < 1 or args.repeats < 1 or args.warmup < 0 or (args.page_size is not None and args.page_size < 1):
        ap.error("--gen-len, --repeats and --page-size must be positive and --warmup >= 0")
    args.modes = ["torch"] + [m for m in args.modes if m != "torch"]


def main(argv=None) -> None:
    """``triton-dist bench e2e``: run the cases (or ``--render`` a recorded run)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_e2e_rows, format_e2e_tables, plot_e2e_rows, default_plot_path)
        return
    _defaults(ap, args)
    from triton_dist.models import generate as G
    try:
        cfg, path = G.resolve_model(args.model, args.layers)
    except ValueError as e:
        ap.error(str(e))
    import torch

    import triton_dist
    from .harness import Recorder
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    heap = None
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and not args.smoke and \
            not os.environ.get("TRITON_DIST_HEAP_SIZE") and \
            os.environ.get("TRITON_DIST_BACKEND", "auto").lower() in ("auto", "cuda"):
        heap = G.heap_bytes_for(cfg, max(args.batch) * max(args.context), int(os.environ.get("WORLD_SIZE", "1")))
    world = triton_dist.init(heap_size=heap)
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench e2e needs a GPU (the CPU world has no meaningful timings; --smoke runs a "
                         "tiny model there as a plumbing check)")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    cases = len(args.batch) * len(args.context)
    progress = Progress(2 * cases * len(args.modes), enabled=world.rank == 0)
    bench = _E2EBench(world, rec, args, dtype, progress)
    if heap and world.rank == 0:
        progress.note(f"symmetric heap {heap / 2**30:.2f} GiB per rank (TRITON_DIST_HEAP_SIZE overrides)")
    name = args.model if path is None else os.path.basename(os.path.normpath(path))
    if args.layers:
        name += f"/{cfg.num_hidden_layers}l"
    ckpt = None if args.random_weights else path
    reference: dict = {}
    for mode in args.modes:
        bench.mode(mode, cfg, name, ckpt, args.batch, args.context, reference)
    progress.finish()
    bench.notes.extend(world_caveats(world))
    bench.finish(args, lambda rows: format_e2e_tables(rows) if e2e_pairs(rows) else "", plot_e2e_rows,
                 default_plot_path)


if __name__ == "__main__":
    main()
