"""The compute cores against cuBLAS and ``torch._grouped_mm`` at world size 1: ``triton-dist bench cores -n 1``.

::

    triton-dist bench cores -n 1 [--cores dense,decode,grouped] [--models qwen3-8b,qwen3-32b,llama3-8b]
                                 [--tp 1,2,4,8] [--m 1,2,4,8,16,32,64,128,256] [--dense-m 1024,2048,4096,8192]
                                 [--samples 20] [--graph-calls 20] [--out DIR] [--plot PATH | --no-plot]
    triton-dist bench cores -n 1 --mode cpu -- --smoke     # CPU world: a plumbing check, no timings
    python -m triton_dist.bench.cores --render bench/results/h200.jsonl [--run-id ID,ID]   # no GPU needed

``dense``: the persistent TMA GEMM of the overlapped ops (``kernels/gemm.py``: ``chunk_tiles``) at world size 1, where
``ops.ag_gemm`` (method ``copy_engine``) and ``ops.gemm_rs`` (``fused``) run it alone with no communication (its
chunk wait still in the kernel), against ``torch.matmul`` (provider ``cublas``) on ``triton-dist bench gemm``'s
shapes (``goal`` and the LLaMA-3-8B / 70B and Qwen2-72B projections at the ``--dense-m`` rows); op ``gemm_core``,
shape ``<ag_gemm|gemm_rs>:<family>:M=..,N=..,K=..``.

``decode``: the decode core (``kernels/decode_gemm.py``) on the projections of a model's decoder layer and its LM
head, ``M x K @ K x N`` with ``B = w.t()`` of the ``nn.Linear`` weight ``w`` [N, K], for every M of ``--m`` and every
tensor-parallel shard of ``--tp`` (column-parallel QKV, gate/up and LM head: N / tp; row-parallel O and down: K / tp).
Providers: ``triton_dist:decode_gemm`` (the autotuner's config: tuned at the first call of each shape bucket, cached;
``TRITON_DIST_AUTOTUNE=0`` for the defaults), on GPUs ``triton_dist:decode_gemm+pdl`` (the same, launched with
programmatic dependent launch: ``decode_gemm(pdl=True)``) and ``cublas`` (``torch.matmul``). A row's ``gbps`` is the
weight bytes over the median (the floor's measure: ~4.3 TB/s device-to-device on an H200), ``tflops`` ``2 M N K``
over it.

``grouped``: the grouped core (``kernels/grouped_gemm.py``, tuned like the decode core) against ``torch._grouped_mm``
(provider ``torch_grouped_mm``; skipped with a note where torch lacks it): prefill groups (E=8, 4096 rows each,
K=4096, N=1792: DESIGN.md's 759 TFLOP/s case) and decode groups (1, 16, 128 rows per expert; E=8 of that shape and
E=128 of Qwen3-30B-A3B's gate/up, K=2048 N=1536), ``gbps`` over the active experts' weight bytes.

Timing: :func:`~triton_dist.bench.harness.time_call` (CUDA-graph replay of ``--graph-calls`` calls for the decode
sizes: launch overhead is what decode pays in a captured step; the slowest rank's median), weights rotated over
enough copies to cover twice the L2 cache so they come from HBM. Before timing, each provider's result on input set 0
is checked against an fp32 ``torch.matmul``; a mismatch is noted, not timed, and makes the command exit non-zero.
Rows go to ``<out>/<card>.jsonl`` (op ``decode_gemm``, shape ``<model>:<proj>/tp<t>:M=..,N=..,K=..``; op
``grouped_gemm``, shape ``<prefill|decode>:E=..,rows=..,N=..,K=..``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass

from .harness import Recorder, agree, first_line, time_call, uniform
from .report import (GEMM_ALONE, Progress, add_render_args, announce_shared_gpu, have_matplotlib, load_runs,
                     plot_ratio_panels, render_recorded)
from .gemm import DTYPE_NAMES, _choices, _int_list, rotation

CORES = ("dense", "decode", "grouped")
DENSE_FAMILIES = ("goal", "llama3-8b", "llama3-70b", "qwen2-72b")
DENSE_M = (1024, 2048, 4096, 8192)
# the providers of a row pair: (ours, baseline)
OURS = {"gemm_core": "triton_dist:gemm_core", "decode_gemm": "triton_dist:decode_gemm",
        "grouped_gemm": "triton_dist:grouped_gemm"}
BASELINE = {"gemm_core": "cublas", "decode_gemm": "cublas", "grouped_gemm": "torch_grouped_mm"}
GOAL = {"gemm_core": 1 / 0.98, "decode_gemm": 1.0, "grouped_gemm": 1.0}  # ours / baseline time at most
DEFAULT_PLOT = os.path.join("docs", "perf", "cores_{card}.png")
# (hidden, intermediate, q heads, kv heads, head dim, vocab) of the decoder layers whose projections we time
MODELS = {"qwen3-8b": (4096, 12288, 32, 8, 128, 151936), "qwen3-32b": (5120, 25600, 64, 8, 128, 151936),
          "llama3-8b": (4096, 14336, 32, 8, 128, 128256)}
DECODE_M = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMOKE_M = (1, 5)


@dataclass(frozen=True)
class Projection:
    """One linear layer of a model at a tensor-parallel degree: ``M x k @ k x n``."""

    model: str
    name: str
    tp: int
    k: int
    n: int

    def shape(self, m: int) -> str:
        return f"{self.model}:{self.name}/tp{self.tp}:M={m},N={self.n},K={self.k}"


def projections(model: str, tp: int) -> list[Projection]:
    """The decoder layer's projections and the LM head of ``model``, sharded ``tp`` ways (column-parallel: N / tp;
    row-parallel: K / tp). A degree that does not divide a dimension raises ValueError."""
    h, inter, q, kv, d, vocab = MODELS[model]
    col = {"qkv": (h, (q + 2 * kv) * d), "gate_up": (h, 2 * inter), "lm_head": (h, vocab)}
    row = {"o": (q * d, h), "down": (inter, h)}
    out = []
    for name in ("qkv", "o", "gate_up", "down", "lm_head"):
        k, n = col[name] if name in col else row[name]
        if name in col:
            if n % tp:
                raise ValueError(f"{model} {name}: N={n} is not divisible by tp={tp}")
            n //= tp
        else:
            if k % tp:
                raise ValueError(f"{model} {name}: K={k} is not divisible by tp={tp}")
            k //= tp
        out.append(Projection(model, name, tp, k, n))
    return out


@dataclass(frozen=True)
class GroupCase:
    """A grouped GEMM: ``counts[e]`` rows for expert ``e`` (sorted by expert), ``[R, k] @ [E, k, n]``."""

    name: str
    counts: tuple
    k: int
    n: int

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def shape(self) -> str:
        e = len(self.counts)
        per = self.counts[0] if len(set(self.counts)) == 1 else "var"
        return f"{self.name}:E={e},rows={per},N={self.n},K={self.k}"


def group_cases() -> list[GroupCase]:
    """Prefill (DESIGN.md's torch._grouped_mm case: 8 experts x 4096 rows, K=4096, N=1792) and decode groups (1, 16
    and 128 rows per expert; 8 experts of that shape, and 128 experts of Qwen3-30B-A3B's gate/up, K=2048 N=1536)."""
    cases = [GroupCase("prefill", (4096,) * 8, 4096, 1792)]
    for r in (1, 16, 128):
        cases.append(GroupCase("decode", (r,) * 8, 4096, 1792))
        cases.append(GroupCase("decode", (r,) * 128, 2048, 1536))
    return cases


def smoke_group_cases() -> list[GroupCase]:
    return [GroupCase("tiny", (5, 0, 7), 64, 48), GroupCase("tiny", (3, 3), 96, 32)]


def smoke_projections() -> list[Projection]:
    return [Projection("tiny", "up", 1, 64, 48), Projection("tiny", "down", 1, 96, 32)]


def decode_tolerance(dtype, k: int) -> float:
    """Relative tolerance (of max |ref|) of a low-precision product against fp32: a few output ulps plus the
    accumulation order's error, which grows like sqrt(K)."""
    import torch
    eps = torch.finfo(dtype).eps
    return 4 * eps + 2e-3 * math.sqrt(k) * eps if dtype != torch.float32 else 1e-4


class CheckedBench:
    """Rows of one bench run: each provider's result checked against a reference first (:meth:`_time`), then timed
    (the slowest rank's samples) and recorded; ``failures`` lists our providers that failed the check. The cores'
    and the attention bench's (``bench/attention.py``) common part."""

    def __init__(self, world, rec: Recorder, args, dtype, progress: Progress):
        import torch
        self.world, self.rec, self.args, self.dtype, self.progress = world, rec, args, dtype, progress
        self.gpu = not world.interpreted
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.l2 = torch.cuda.get_device_properties(world.device).L2_cache_size if self.gpu else 0
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.steps = 0

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        if self.world.rank == 0:
            self.progress.note(msg)

    def rand(self, shape, seed: int, scale: float = 1.0):
        return uniform(shape, seed, self.dtype, self.world.device, scale)

    def finish(self, args, fmt, plot, default_path) -> None:
        """The end of a run on rank 0: the rows' table, the rows appended (not for ``--smoke`` without ``--out``),
        the bench's own tables (``fmt(rows)``) and plot (``plot(rows, path)``, unless ``--no-plot`` or a smoke run
        without ``--plot``); then finalize, and exit 1 if one of our providers failed its check."""
        import triton_dist
        if self.world.rank == 0:
            print(self.rec.table(self.notes))
            if not args.smoke or args.out:
                print("rows:", self.rec.write())
            rows = [asdict(r) for r in self.rec.rows]
            tables = fmt(rows) if rows else ""
            if tables:
                print(tables)
                if not args.no_plot and (not args.smoke or args.plot):
                    written = plot(rows, args.plot or default_path(rows[0]["card"]))
                    if written:
                        print(f"plot written to {written}")
        triton_dist.finalize()
        if self.failures:
            sys.exit(1)

    def _time(self, op: str, shape: str, providers, ref, tol: float, rot: int, *, nbytes: int, flops: int,
              graph: int) -> None:
        """Check each provider's result on input set 0 against ``ref`` (max error <= ``tol``), then time it; a
        failure is noted (ours: also a failure of the run) and not timed."""
        for provider, call in providers:
            self.steps += 1
            self.progress.update(self.steps, f"{op} {shape} {provider}")
            err = None
            try:
                got = call(0)
                self.world.synchronize()
                diff = (got.float() - ref).abs().max().item()
                if not diff <= tol:
                    err = f"max error {diff:.3g} > {tol:.3g}"
            except Exception as e:  # noqa: BLE001  (noted, the other providers still run)
                err = first_line(e)
            failed = agree(err, self.world.group)
            if failed:
                self.note(f"{shape} {provider}: not timed: {'; '.join(failed)}")
                if provider.startswith("triton_dist"):
                    self.failures.append(f"{shape} {provider}")
                continue
            samples, note = time_call(call, samples=self.args.samples, group=self.world.group, gpu=self.gpu,
                                      rot=rot, graph_calls=graph)
            if note:
                self.note(f"{shape} {provider}: {note}")
            self.rec.add(op, shape, str(self.dtype).replace("torch.", ""), provider, samples, nbytes=nbytes,
                         flops=flops)


class CoreBench(CheckedBench):
    """The three cores' cases."""

    # ------------------------------------------------------------------ dense
    def dense(self, case) -> None:
        """``case`` (a ``bench.gemm.Case``): ours through the op at world size 1, cuBLAS on the same operands."""
        import torch
        from triton_dist import ops
        seed = zlib.crc32(f"{case.op}:{case.shape}".encode())
        a = self.rand((case.m, case.k), seed)
        b = self.rand((case.n, case.k), seed + 1, 1 / math.sqrt(case.k)).t()  # w.t() of an nn.Linear weight
        ref = a.float() @ b.float()
        tol = decode_tolerance(self.dtype, case.k) * ref.abs().max().item()
        out = torch.empty((case.m, case.n), dtype=self.dtype, device=self.world.device)
        if case.op == "ag_gemm":
            ours = lambda i: ops.ag_gemm(a, b, method="copy_engine", out=out)  # noqa: E731
        else:
            ours = lambda i: ops.gemm_rs(a, b, method="fused", out=out)  # noqa: E731
        providers = [(OURS["gemm_core"], ours), ("cublas", lambda i: torch.matmul(a, b, out=out))]
        self._time("gemm_core", f"{case.op}:{case.shape}", providers, ref, tol, 1,
                   nbytes=(case.m * case.k + case.k * case.n + case.m * case.n) * self.elem,
                   flops=2 * case.m * case.n * case.k, graph=0)
        ops.release_contexts()  # each shape's context (up to ~0.5 GB of symmetric heap) is not needed again

    # ------------------------------------------------------------------ decode
    def decode(self, proj: Projection, m: int) -> None:
        import torch
        from triton_dist.kernels import decode_gemm as dg
        rot = rotation((m * proj.k + proj.k * proj.n) * self.elem, self.l2, cap=16)
        seed = zlib.crc32(proj.shape(m).encode())
        sets = [(self.rand((m, proj.k), seed + 2 * i),
                 self.rand((proj.n, proj.k), seed + 2 * i + 1, 1 / math.sqrt(proj.k)).t()) for i in range(rot)]
        a0, b0 = sets[0]
        ref = a0.float() @ b0.float()
        tol = decode_tolerance(self.dtype, proj.k) * ref.abs().max().item()
        outs = [torch.empty((m, proj.n), dtype=self.dtype, device=self.world.device) for _ in range(rot)]
        # config None: the autotuner's choice (its first call, in the check below, tunes the shape bucket)
        providers = [("triton_dist:decode_gemm", lambda i: dg.decode_gemm(sets[i][0], sets[i][1], out=outs[i])),
                     ("cublas", lambda i: torch.matmul(sets[i][0], sets[i][1], out=outs[i]))]
        if self.gpu:  # the same config launched with programmatic dependent launch (back to back in the graph)
            providers.insert(1, ("triton_dist:decode_gemm+pdl",
                                 lambda i: dg.decode_gemm(sets[i][0], sets[i][1], out=outs[i], pdl=True)))
        self._time("decode_gemm", proj.shape(m), providers, ref, tol, rot, nbytes=proj.k * proj.n * self.elem,
                   flops=2 * m * proj.n * proj.k, graph=self.args.graph_calls if self.gpu else 0)

    # ------------------------------------------------------------------ grouped
    def grouped(self, case: GroupCase) -> None:
        import torch
        from triton_dist.kernels import grouped_gemm as gg
        e = len(case.counts)
        seed = zlib.crc32(case.shape().encode())
        rot = rotation((case.rows * case.k + e * case.k * case.n) * self.elem, self.l2, cap=8)
        offs = torch.tensor([0] + list(case.counts), dtype=torch.int64).cumsum(0).to(torch.int32).to(
            self.world.device)
        sets = [(self.rand((case.rows, case.k), seed + 2 * i),
                 self.rand((e, case.k, case.n), seed + 2 * i + 1, 1 / math.sqrt(case.k))) for i in range(rot)]
        x0, w0 = sets[0]
        ref = gg.grouped_gemm_reference(x0.float(), w0.float(), offs.cpu().to(self.world.device)).float()
        tol = decode_tolerance(self.dtype, case.k) * max(ref.abs().max().item(), 1e-30)
        outs = [torch.empty((case.rows, case.n), dtype=self.dtype, device=self.world.device) for _ in range(rot)]

        def torch_mm(i):
            got, why = gg.torch_grouped_mm(sets[i][0], sets[i][1], offs)
            if got is None:
                raise RuntimeError(f"skipped: {why}")
            return got

        providers = [("triton_dist:grouped_gemm", lambda i: gg.grouped_gemm(sets[i][0], sets[i][1], offs,
                                                                             out=outs[i])),
                     ("torch_grouped_mm", torch_mm)]
        active = sum(1 for c in case.counts if c)
        self._time("grouped_gemm", case.shape(), providers, ref, tol, rot,
                   nbytes=active * case.k * case.n * self.elem, flops=2 * case.rows * case.n * case.k,
                   graph=self.args.graph_calls if self.gpu and case.name != "prefill" else 0)

def dense_cases(smoke: bool, ms) -> list:
    """The dense core's cases: ``bench gemm``'s ag_gemm and gemm_rs shapes at world size 1 (``goal`` and the model
    families at the rows ``ms``), or one tiny case of each op for ``--smoke``."""
    from .gemm import Case, build_cases
    if smoke:
        return [Case("ag_gemm", "smoke", 48, 40, 32), Case("gemm_rs", "smoke", 40, 24, 48)]
    cases, _ = build_cases(("ag_gemm", "gemm_rs"), DENSE_FAMILIES, 1, ms, ())
    return cases


# bench gemm's world-1 rows are dense-core rows too: these methods of ag_gemm / gemm_rs run the same kernel alone there
# (sequential and decomposed are torch.matmul at world size 1)
_GEMM_FUSED = tuple(f"triton_dist:{m}" for m in ("copy_engine", "sm", "fused", "sequential_reduce"))


def core_pairs(rows: list[dict]) -> dict:
    """``{op: {shape: (ours_us, baseline_us)}}`` of the cores' rows (``gemm_core``, ``decode_gemm``,
    ``grouped_gemm``), plus ``bench gemm``'s world-size-1 ``ag_gemm`` / ``gemm_rs`` rows as ``gemm_core`` (ours: the
    slowest fused method; baseline ``gemm_alone``). A later row of the same (op, shape, provider) replaces an
    earlier one."""
    cells: dict = {}
    for r in rows:
        op, prov = r["op"], r["provider"]
        if op in ("ag_gemm", "gemm_rs") and r.get("world_size") == 1:
            shape = f"{op}:{r['shape']}"
            if prov in _GEMM_FUSED:
                cells.setdefault(("gemm_core", shape), {}).setdefault("ours", {})[prov] = r["median_us"]
            elif prov == GEMM_ALONE:
                cells.setdefault(("gemm_core", shape), {})["base"] = r["median_us"]
        elif op in OURS:
            if prov == OURS[op]:
                cells.setdefault((op, r["shape"]), {})["ours"] = {prov: r["median_us"]}
            elif prov == BASELINE[op]:
                cells.setdefault((op, r["shape"]), {})["base"] = r["median_us"]
    out: dict = {}
    for (op, shape), c in cells.items():
        if c.get("ours") and c.get("base"):
            out.setdefault(op, {})[shape] = (max(c["ours"].values()), c["base"])
    return {op: out[op] for op in OURS if op in out}


def load_core_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The cores' rows in a ``<card>.jsonl`` (and ``bench gemm``'s world-size-1 rows): of the runs ``run_id`` (one id or
    a comma-separated list), default every run, in file order."""
    rows = load_runs(path, lambda r: r.get("op") in OURS or (
        r.get("op") in ("ag_gemm", "gemm_rs") and r.get("world_size") == 1), run_id)
    if not core_pairs(rows):
        raise ValueError(f"{path} holds no compute-core rows" + (f" of run(s) {run_id}" if run_id else ""))
    return rows


def format_core_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """Per core: each shape's time, the baseline's, the ratio and whether it meets the goal (``GOAL``)."""
    lines = []
    for op, shapes in core_pairs(rows).items():
        met = sum(1 for o, b in shapes.values() if o / b <= GOAL[op])
        lines.append(f"{op}: ours / {BASELINE[op]} time (goal <= {GOAL[op]:.4g}): {met} of {len(shapes)} met")
        for shape, (o, b) in shapes.items():
            lines.append(f"  {shape:<56} {o:10.1f} us {b:10.1f} us  x{o / b:6.3f}{'' if o / b <= GOAL[op] else '  *'}")
    lines.extend(f"note: {n}" for n in notes or ())
    return "\n".join(lines)


def default_plot_path(card: str) -> str:
    from .harness import card_slug
    return DEFAULT_PLOT.format(card=card_slug(card))


def plot_core_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """One panel per core: a bar per shape of ours / baseline time, the goal as a line; green where met. Saved as
    PNG at ``path``; returns it, or None (with a printed note) without matplotlib or core rows."""
    if not have_matplotlib(path):
        return None
    pairs = core_pairs(rows)
    if not pairs:
        print(f"note: no compute-core rows to plot ({path} skipped)")
        return None
    panels = [(op, list(shapes), [o / b for o, b in shapes.values()], GOAL[op], BASELINE[op])
              for op, shapes in pairs.items()]
    if title is None:
        r0 = rows[-1]
        runs = sorted({r.get("run_id", "?") for r in rows})
        title = f"{r0.get('card', '?')}: compute cores at world size 1 ({r0.get('date', '?')}, runs {', '.join(runs)})"
    return plot_ratio_panels(panels, path, title, rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triton-dist bench cores", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="directory of <card>.jsonl [default: bench/results; with --smoke: write nothing]")
    ap.add_argument("--cores", type=_choices(CORES), default=list(CORES), help="comma-separated subset of "
                                                                                  + ",".join(CORES))
    ap.add_argument("--models", type=_choices(MODELS), default=list(MODELS),
                    help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--tp", type=_int_list, default=[1, 2, 4, 8], help="tensor-parallel shards [default: 1,2,4,8]")
    ap.add_argument("--m", type=_int_list, default=None,
                    help=f"rows of the decode core [default: {','.join(map(str, DECODE_M))}]")
    ap.add_argument("--dense-m", type=_int_list, default=None,
                    help=f"rows of the dense core's model shapes [default: {','.join(map(str, DENSE_M))}]")
    add_timing_args(ap)
    add_render_args(ap, DEFAULT_PLOT.format(card="<card>"))
    return ap


def add_timing_args(ap: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--samples``, ``--graph-calls`` and ``--smoke`` of the single-GPU benches (cores, attention);
    :func:`timing_defaults` fills them in after parsing."""
    ap.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None, help="[default: bf16; --smoke: fp16]")
    ap.add_argument("--samples", type=int, default=None, help="timed samples per case [default: 20; --smoke: 2]")
    ap.add_argument("--graph-calls", type=int, default=20, help="decode calls captured per CUDA graph (0: direct)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, allowed in the CPU world (wall-clock timing): checks the plumbing only")


def timing_defaults(ap: argparse.ArgumentParser, args) -> None:
    """Check and default the :func:`add_timing_args` options (smoke: 2 samples of fp16; else 20 of bf16)."""
    if args.samples is not None and args.samples < 1 or args.graph_calls < 0:
        ap.error("--samples must be positive and --graph-calls >= 0")
    args.samples = args.samples or (2 if args.smoke else 20)
    args.dtype = args.dtype or ("fp16" if args.smoke else "bf16")


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_core_rows, format_core_tables, plot_core_rows, default_plot_path)
        return
    timing_defaults(ap, args)
    ms = args.m or list(SMOKE_M if args.smoke else DECODE_M)
    import torch

    import triton_dist
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    world = triton_dist.init()
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench cores needs a GPU (the CPU world has no meaningful timings; --smoke runs "
                         "tiny shapes there as a plumbing check)")
    if world.world_size != 1:
        raise SystemExit(f"triton-dist bench cores times single-GPU kernels: run it with -n 1 (got {world.world_size} "
                         "ranks)")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    projs = smoke_projections() if args.smoke else [p for model in args.models for tp in args.tp
                                                    for p in projections(model, tp)]
    groups = smoke_group_cases() if args.smoke else group_cases()
    dense = dense_cases(args.smoke, args.dense_m or list(DENSE_M))
    progress = Progress(2 * (len(dense) * ("dense" in args.cores) + len(projs) * len(ms) * ("decode" in args.cores)
                             + len(groups) * ("grouped" in args.cores)), enabled=world.rank == 0)
    bench = CoreBench(world, rec, args, dtype, progress)
    if "dense" in args.cores:
        for case in dense:
            bench.dense(case)
    if "decode" in args.cores:
        for proj in projs:
            for m in ms:
                bench.decode(proj, m)
    if "grouped" in args.cores:
        for case in groups:
            bench.grouped(case)
    progress.finish()
    bench.finish(args, format_core_tables, plot_core_rows, default_plot_path)


if __name__ == "__main__":
    main()
