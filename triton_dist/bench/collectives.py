"""Collective benchmarks against NCCL and PyTorch symmetric memory: ``triton-dist bench collectives``.

::

    triton-dist bench collectives [--out DIR] [--ops all_reduce,all_gather,reduce_scatter,all_to_all]
                                  [--min-bytes 4K] [--max-bytes 256M] [--step 4] [--dtype bf16] [--samples 20]
                                  [--graph-below 1M] [--graph-calls 20] [--plot PATH | --no-plot]
    python -m triton_dist.bench.collectives --render bench/results/h100.jsonl [--run-id ID]   # no GPUs needed

Sweep: per-rank message sizes ``S`` from ``--min-bytes`` to ``--max-bytes`` in x``--step`` steps. What ``S`` is, per op
(the row's ``shape`` is ``nbytes=S``):

==================  ================================  ==================  =======================================
op                  shards per rank                   algbw bytes         providers
==================  ================================  ==================  =======================================
``all_reduce``      S in -> S out                     S                   ``triton_dist:one_shot``, ``:two_shot``,
                                                                          ``nccl``, ``torch_symm_mem:one_shot``,
                                                                          ``torch_symm_mem:two_shot``
``all_gather``      S in -> world*S out               world*S             ``triton_dist:pull``, ``:push``, ``nccl``
``reduce_scatter``  world*S in -> S out               world*S             ``triton_dist:full_mesh``, ``nccl``
``all_to_all``      world*S in -> world*S out         world*S             ``triton_dist``, ``nccl``
                    (S to each rank, itself included)
==================  ================================  ==================  =======================================

**Bus bandwidth** (nccl-tests' conventions, GB = 1e9 bytes): ``algbw = algbw bytes / time`` and
``busbw = algbw * factor`` with factor ``2(n-1)/n`` for all_reduce and ``(n-1)/n`` for all_gather, reduce_scatter
and all_to_all (n = world size). The rows' ``gbps`` is **busbw**; it is comparable across ops and world sizes with
the per-GPU link bandwidth.

Timing (``harness.time_op``: barrier, GPU sleep while the host enqueues, CUDA events, the slowest rank's median):
sizes below ``--graph-below`` are timed as CUDA-graph replays of ``--graph-calls`` back-to-back calls (time / calls);
larger sizes one call per sample. If a provider's graph capture fails on any rank, every rank times it directly and
a note says so. When ``--graph-calls`` inputs would not fit in L2 together, calls rotate over enough input buffers to
cover twice the L2 cache (smaller inputs stay L2-resident, as they are right after the kernel that produced them).

Data: uniform random in [-1, 1), different on every rank. Before timing, each (op, size) checks every provider's
result on one input against NCCL's: exact for all_gather and all_to_all; for the reductions, against NCCL's sum of
the fp32-upcast inputs with fp32-accumulation tolerance (one final rounding: ``rtol = eps(dtype)``,
``atol = world^2 eps(fp32)``). A triton_dist mismatch raises; a baseline that is unavailable (raises) or wrong
(checked with the looser bound of chained low-precision roundings) is skipped with a printed note. Our ops return a
new tensor per call; NCCL's all_reduce and torch's two_shot_all_reduce_ work in place, so their timed buffers hold
zeros (a sum of zeros stays finite over many calls; the check used random data).

Rows go to ``<out>/<card>.jsonl`` (one ``run_id`` for the whole sweep); rank 0 prints one table per op (median us and
busbw per provider, baseline time / our best time) and plots ``docs/perf/collectives_<card>.png`` when matplotlib
is importable. ``--smoke`` runs the loop in the CPU world with wall-clock timing (plumbing check; writes nothing).
In a shared-GPU world (``triton-dist run --share-gpus``: several ranks on one GPU) only our providers run (NCCL and
symmetric memory cannot; :func:`provider_plan`), a banner says the times are not performance, and every row is marked
``shared_gpu``. ``-n 1`` runs our ops with nothing to communicate (the no-communication reference; busbw is 0 there).
Unless ``TRITON_DIST_HEAP_SIZE`` is set, the symmetric heap is sized for ``--max-bytes`` (:func:`heap_bytes_for`);
the ops' cached contexts are released after each op.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import asdict

from .harness import Skip as _Skip
from .harness import agree as _agree
from .harness import first_line, group_errors, time_call, uniform
from .report import (DEFAULT_PLOT, OPS, OURS, SHARED_GPU_NO_NCCL, SHARED_GPU_NO_SYMM_MEM, Progress, add_render_args,
                     announce_shared_gpu, default_plot_path, fmt_bytes, format_tables, load_rows, plot_rows,
                     render_recorded, report_run)

OUR_METHODS = {"all_reduce": ("ll", "one_shot", "two_shot", "push_one_shot", "push_two_shot"),
               "all_gather": ("ll", "pull", "push", "ring", "copy_engine"),
               "reduce_scatter": ("full_mesh", "push", "ring"), "all_to_all": ("kernel", "copy_engine")}
SYMM_MEM_METHODS = {"all_reduce": ("one_shot", "two_shot")}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (no GPU, no torch.distributed): sizes, bus bandwidth, progress, tables, plots. Tested on fake rows.
# ----------------------------------------------------------------------------------------------------------------

_BYTES_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*$")


def parse_bytes(text) -> int:
    """``"4096"``, ``"4K"``, ``"64KiB"``, ``"256M"``, ``"1G"`` -> bytes (K/M/G are powers of 1024)."""
    m = _BYTES_RE.match(str(text))
    if not m:
        raise ValueError(f"expected a byte count like 4096, 64K or 256M, got {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def size_sweep(min_bytes: int, max_bytes: int, step: int = 4) -> list[int]:
    """``min_bytes * step**k`` for every k with the result <= ``max_bytes`` (so ``max_bytes`` only if on the grid)."""
    if min_bytes <= 0:
        raise ValueError(f"--min-bytes must be positive, got {min_bytes}")
    if max_bytes < min_bytes:
        raise ValueError(f"--max-bytes ({max_bytes}) is smaller than --min-bytes ({min_bytes})")
    if step < 2:
        raise ValueError(f"--step must be at least 2, got {step}")
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= step
    return sizes


def parse_ops(text: str) -> list[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"--ops: expected a comma-separated subset of {','.join(OPS)}, got {text!r}")
    return list(dict.fromkeys(ops))


def alg_bytes(op: str, nbytes: int, world: int) -> int:
    """Bytes of nccl-tests' algbw for per-rank size ``nbytes`` (the module docstring's table)."""
    if op == "all_reduce":
        return nbytes
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return world * nbytes
    raise ValueError(f"unknown op {op!r}")


def bus_factor(op: str, world: int) -> float:
    """nccl-tests' busbw / algbw: ``2(n-1)/n`` for all_reduce, ``(n-1)/n`` for the others."""
    if op == "all_reduce":
        return 2 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (world - 1) / world
    raise ValueError(f"unknown op {op!r}")


def bus_bytes(op: str, nbytes: int, world: int) -> float:
    """algbw bytes x bus factor: divided by the time it gives busbw (``Recorder.add(nbytes=...)`` does that)."""
    return alg_bytes(op, nbytes, world) * bus_factor(op, world)


def busbw_gbps(op: str, nbytes: int, world: int, us: float) -> float:
    return bus_bytes(op, nbytes, world) / (us * 1e-6) / 1e9


def provider_plan(ops, *, gpu: bool, shared_gpu: bool = False,
                  host_backend: str = "gloo") -> tuple[dict[str, list[str]], list[str]]:
    """The providers each op runs (ours first, then the baselines) and notes for the baselines left out.

    The process-group baseline is ``nccl`` on GPUs and ``host_backend`` (gloo) in the CPU world, a plumbing check
    there; PyTorch's symmetric memory runs on GPUs only. A shared-GPU world (``shared_gpu``: several ranks on one
    GPU) runs neither baseline, only ours: NCCL cannot (its process group is gloo there, and gloo on one GPU is no
    baseline), nor can symmetric memory. The notes say what was left out and why.
    """
    plan, no_nccl, no_symm = {}, [], []
    for op in ops:
        names = [f"{OURS}:{m}" for m in OUR_METHODS[op]]
        if shared_gpu:
            no_nccl.append(op)
        else:
            names.append("nccl" if gpu else host_backend)
        symm = [f"torch_symm_mem:{m}" for m in SYMM_MEM_METHODS.get(op, ())]
        if symm and (shared_gpu or not gpu):
            no_symm.append(f"{op} {', '.join(symm)}")
        else:
            names += symm
        plan[op] = names
    notes = []
    if no_nccl:
        notes.append(f"nccl not run ({', '.join(no_nccl)}): {SHARED_GPU_NO_NCCL}")
    if no_symm:
        why = SHARED_GPU_NO_SYMM_MEM if shared_gpu else "PyTorch's symmetric memory needs CUDA (the CPU world)"
        notes.append(f"torch_symm_mem not run ({'; '.join(no_symm)}): {why}")
    return plan, notes


def heap_bytes_for(world: int, max_bytes: int) -> int:
    """Symmetric heap for the sweep: one op's contexts at a time (released between ops), each replaced as sizes grow
    (so up to ~4/3 of the largest staging, up to ``world * max_bytes``, with the smaller ones' holes) with
    room for ops that stage twice that; at least 2 GiB."""
    return max(2 << 30, 3 * world * max_bytes + (256 << 20))


def reduction_tolerance(dtype, world: int, *, fp32_accumulation: bool = True) -> tuple[float, float]:
    """(rtol, atol) for a sum of ``world`` inputs in [-1, 1) against the exact (fp32) sum.

    fp32 accumulation rounds once to ``dtype``: error <= eps/2 |sum|, plus fp32 order differences
    (<= world roundings of partial sums <= world). Chained low-precision accumulation (``fp32_accumulation=False``,
    e.g. a ring in bf16) rounds after every hop: up to (world-1)/2 eps of partial sums <= world.
    """
    import torch
    eps = torch.finfo(dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    if fp32_accumulation:
        return eps, world * world * eps32
    return eps, max(world * world * eps / 2, world * world * eps32)


def compare(got, ref, *, exact: bool, dtype, world: int, fp32_accumulation: bool = True) -> str | None:
    """None if ``got`` matches the reference, else what is wrong. ``exact``: bitwise equal to ``ref``; otherwise
    ``ref`` is the fp32 sum and ``got`` must be within :func:`reduction_tolerance`."""
    import torch
    if tuple(got.shape) != tuple(ref.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if exact:
        if got.dtype == ref.dtype and torch.equal(got, ref):
            return None
        bad = (got != ref).reshape(-1).nonzero()
        first = f" (first at flat index {int(bad[0])})" if bad.numel() else ""
        return f"{bad.numel()} of {got.numel()} elements differ from NCCL's{first}"
    rtol, atol = reduction_tolerance(dtype, world, fp32_accumulation=fp32_accumulation)
    g, r = got.float().reshape(-1), ref.float().reshape(-1)
    err = (g - r).abs()
    lim = atol + rtol * r.abs()
    if bool((err <= lim).all()):  # NaN compares False: a NaN fails
        return None
    i = int(torch.nan_to_num(err - lim, nan=math.inf).argmax())
    return (f"max error {err.max().item():.3g} exceeds the {'fp32' if fp32_accumulation else 'low-precision'}-"
            f"accumulation tolerance (rtol {rtol:.3g}, atol {atol:.3g}); worst at flat index {i}: got "
            f"{g[i].item():.6g}, NCCL fp32 sum {r[i].item():.6g}")


class _Bench:
    def __init__(self, world, rec, args, dtype, progress: Progress, plan: dict[str, list[str]]):
        import torch
        self.world, self.rec, self.args, self.dtype, self.progress = world, rec, args, dtype, progress
        self.plan = plan  # provider_plan's: the providers of each op
        self.group = world.group
        self.n = world.world_size
        self.notes: list[str] = []
        self.gpu = not world.interpreted
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.l2 = torch.cuda.get_device_properties(world.device).L2_cache_size if self.gpu else 0
        self.step = 0

    # -- helpers --------------------------------------------------------------------------------------------------
    def note(self, msg: str) -> None:
        self.notes.append(msg)
        if self.world.rank == 0:
            self.progress.note(msg)

    def sync(self) -> None:
        import triton_dist
        triton_dist.synchronize()

    def rand(self, numel: int, seed: int):
        return uniform(numel, seed, self.dtype, self.world.device)

    def rotation(self, in_bytes: int) -> int:
        """Input buffers to rotate over: enough to cover 2x L2 when ``graph_calls`` inputs would overflow it."""
        k = self.args.graph_calls
        if not self.gpu or in_bytes * k < self.l2:
            return 1
        return max(1, min(k, math.ceil(2 * self.l2 / in_bytes)))

    def time(self, call, rot: int, nbytes: int, provider: str, op: str) -> list[float]:
        """Per-call microseconds (slowest rank's samples): graph replay below --graph-below, else direct."""
        args = self.args
        graph_calls = args.graph_calls if nbytes < args.graph_below else 0
        samples, note = time_call(call, samples=args.samples, group=self.group, gpu=self.gpu, rot=rot,
                                  graph_calls=graph_calls)
        if note:
            self.note(f"{op} {fmt_bytes(nbytes)} {provider}: {note}")
        return samples

    # -- one (op, size) -------------------------------------------------------------------------------------------
    def case(self, op: str, nbytes: int):
        """Inputs (``rot`` buffers), the reference result of input 0, whether it is exact, per-rank input bytes."""
        import torch
        import torch.distributed as dist
        numel = nbytes // self.elem
        n, me = self.n, self.world.rank
        in_numel = numel if op in ("all_reduce", "all_gather") else n * numel
        rot = self.rotation(in_numel * self.elem)
        seed = 7919 * (OPS.index(op) + 1) + 104729 * (nbytes.bit_length()) + 1000003 * me
        xs = [self.rand(in_numel, seed + i) for i in range(rot)]
        x = xs[0]
        if op == "all_reduce":
            ref = x.to(torch.float32, copy=True)  # copy: for fp32 inputs .float() would alias x
            dist.all_reduce(ref, group=self.group)
            exact = False
        elif op == "reduce_scatter":
            acc = x.to(torch.float32, copy=True)
            dist.all_reduce(acc, group=self.group)
            ref = acc[me * numel:(me + 1) * numel].clone()
            exact = False
        elif op == "all_gather":
            parts = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(parts, x, group=self.group)
            ref = torch.cat(parts)
            exact = True
        else:
            ref = torch.empty_like(x)
            dist.all_to_all_single(ref, x, group=self.group)
            exact = True
        self.sync()
        return xs, ref, exact, rot

    def providers(self, op: str, xs, numel: int):
        """``[(provider, ours, setup)]`` for the providers of ``self.plan[op]``; ``setup()`` returns ``call(i)`` (runs
        the op on input i, returns the result to check) and may raise :class:`_Skip`."""
        import torch
        import torch.distributed as dist
        from triton_dist import ops
        from triton_dist.kernels._ll import LL_MAX_BYTES
        group, n = self.group, self.n
        out = []
        for method in OUR_METHODS[op]:
            name = OURS if method is None else f"{OURS}:{method}"

            def setup(method=method):
                fn = getattr(ops, op, None)
                if fn is None:
                    raise _Skip(f"triton_dist.ops has no {op}")
                if method == "ll" and numel * xs[0].element_size() > LL_MAX_BYTES:
                    raise _Skip(f"ll is for messages of at most {LL_MAX_BYTES} bytes")
                kw = {} if method is None else {"method": method}
                return lambda i: fn(xs[i], **kw)
            out.append((name, True, setup))

        def nccl_setup():
            if op == "all_reduce":
                bufs = [torch.zeros_like(x) for x in xs]
                probe = xs[0].clone()

                def call(i):
                    if call.first:  # the check runs on random data, timing on the zero buffers
                        call.first = False
                        dist.all_reduce(probe, group=group)
                        return probe
                    dist.all_reduce(bufs[i], group=group)
                    return bufs[i]
                call.first = True
                return call
            if op == "all_gather":
                o = torch.empty(n * numel, dtype=self.dtype, device=self.world.device)
                return lambda i: (dist.all_gather_into_tensor(o, xs[i], group=group), o)[1]
            if op == "reduce_scatter":
                o = torch.empty(numel, dtype=self.dtype, device=self.world.device)
                return lambda i: (dist.reduce_scatter_tensor(o, xs[i], group=group), o)[1]
            o = torch.empty_like(xs[0])
            return lambda i: (dist.all_to_all_single(o, xs[i], group=group), o)[1]
        base = [p for p in self.plan[op] if p.split(":", 1)[0] not in (OURS, "torch_symm_mem")]
        out += [(p, False, nccl_setup) for p in base]  # nccl (GPUs) or gloo (CPU world); none in a shared world

        for method in SYMM_MEM_METHODS.get(op, ()):
            def symm_setup(method=method):
                if not self.gpu:
                    raise _Skip("PyTorch symmetric memory needs CUDA")
                import torch.distributed._symmetric_memory as symm_mem
                gname = group.group_name
                bufs = []
                for x in xs:
                    b = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
                    symm_mem.rendezvous(b, gname)
                    b.copy_(x)
                    bufs.append(b)
                if method == "one_shot":
                    return lambda i: torch.ops.symm_mem.one_shot_all_reduce(bufs[i], "sum", gname)

                def call(i):  # in place: checked once on random data, then timed on zeros
                    torch.ops.symm_mem.two_shot_all_reduce_(bufs[i], "sum", gname)
                    if call.first:
                        call.first = False
                        res = bufs[0].clone()
                        for b in bufs:
                            b.zero_()
                        return res
                    return bufs[i]
                call.first = True
                return call
            out.append((f"torch_symm_mem:{method}", False, symm_setup))
        planned = set(self.plan[op])
        return [p for p in out if p[0] in planned]

    def run_op(self, op: str, sizes: list[int]) -> None:
        from triton_dist import ops
        for nbytes in sizes:
            xs, ref, exact, rot = self.case(op, nbytes)
            numel = nbytes // self.elem
            for provider, ours, setup in self.providers(op, xs, numel):
                self.step += 1
                if self.world.rank == 0:
                    self.progress.update(self.step, f"{op} {fmt_bytes(nbytes)} {provider}")
                self.one(op, nbytes, provider, ours, setup, ref, exact, rot)
            del xs, ref
            if self.gpu:
                import torch
                torch.cuda.empty_cache()  # sizes grow x4: hand back the previous size's blocks
        release = getattr(ops, "release_contexts", None)
        if release is not None:
            release()  # the next op's contexts start from an empty heap

    def one(self, op, nbytes, provider, ours, setup, ref, exact, rot) -> None:
        err, call = None, None
        try:
            call = setup()
            got = call(0)
            self.sync()
            err = compare(got, ref, exact=exact, dtype=self.dtype, world=self.n, fp32_accumulation=ours)
            mismatch = err is not None
            del got
        except _Skip as e:
            err, mismatch = str(e), False
        except Exception as e:  # noqa: BLE001
            if ours and not isinstance(e, (ValueError, TypeError, NotImplementedError, MemoryError)):
                raise
            err, mismatch = first_line(e), False
        failed = _agree(None if err is None else f"{'MISMATCH ' if mismatch else ''}{err}", self.group)
        if failed:
            if ours and any("MISMATCH" in f for f in failed):
                raise RuntimeError(f"{op} {fmt_bytes(nbytes)} {provider}: result differs from NCCL's: "
                                   + "; ".join(failed))
            self.note(f"{op} {fmt_bytes(nbytes)} {provider}: not timed ({'; '.join(failed)})")
            return
        samples = self.time(call, rot, nbytes, provider, op)
        self.rec.add(op, f"nbytes={nbytes}", str(self.dtype).replace("torch.", ""), provider, samples,
                     nbytes=bus_bytes(op, nbytes, self.n))
        del call
        self.sync()


__all__ = ["alg_bytes", "build_parser", "bus_bytes", "bus_factor", "busbw_gbps", "compare", "group_errors",
           "heap_bytes_for", "main", "parse_bytes", "parse_ops", "provider_plan", "reduction_tolerance", "size_sweep"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triton-dist bench collectives", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("bench", "results"), help="directory of <card>.jsonl")
    ap.add_argument("--ops", type=parse_ops, default=list(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--min-bytes", type=parse_bytes, default=4 << 10, help="smallest per-rank size (4096, 4K, ...)")
    ap.add_argument("--max-bytes", type=parse_bytes, default=256 << 20, help="largest per-rank size")
    ap.add_argument("--step", type=int, default=4, help="size multiplier between sweep points")
    ap.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="bf16")
    ap.add_argument("--samples", type=int, default=20, help="timed samples per (op, size, provider)")
    ap.add_argument("--graph-below", type=parse_bytes, default=1 << 20,
                    help="sizes below this are timed by CUDA-graph replay (0: never)")
    ap.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--smoke", action="store_true",
                    help="allow the CPU world (wall-clock timing, nothing written): checks the plumbing only")
    add_render_args(ap, DEFAULT_PLOT)
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_rows, format_tables, plot_rows, default_plot_path)
        return
    try:
        sizes = size_sweep(args.min_bytes, args.max_bytes, args.step)
    except ValueError as e:
        ap.error(str(e))
    if args.samples < 1 or args.graph_calls < 1:
        ap.error("--samples and --graph-calls must be positive")

    import warnings

    import torch

    import triton_dist
    from triton_dist.bench.harness import Recorder
    # torch >= 2.13 renames all_gather_into_tensor / reduce_scatter_tensor (*_single); the old names still work
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    elem = torch.empty((), dtype=dtype).element_size()
    odd = [s for s in sizes if s % elem]
    if odd:
        ap.error(f"sizes must be multiples of the {args.dtype} element size ({elem} bytes): {odd}")

    heap = None
    gpu_expected = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if gpu_expected and not os.environ.get("TRITON_DIST_HEAP_SIZE") and \
            os.environ.get("TRITON_DIST_BACKEND", "auto").lower() in ("auto", "cuda"):
        heap = heap_bytes_for(int(os.environ.get("WORLD_SIZE", "1")), max(sizes))
    world = triton_dist.init(heap_size=heap)
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench collectives needs GPUs (the CPU world has no meaningful timings; "
                         "--smoke runs the loop there as a plumbing check)")
    announce_shared_gpu(world)
    rec = Recorder(args.out, world.world_size, world.rank, shared_gpu=world.shared_gpu)
    plan, plan_notes = provider_plan(args.ops, gpu=not world.interpreted, shared_gpu=world.shared_gpu,
                                     host_backend=world.host_backend)
    progress = Progress(sum(len(plan[op]) for op in args.ops) * len(sizes), enabled=world.rank == 0)
    bench = _Bench(world, rec, args, dtype, progress, plan)
    for msg in plan_notes:
        bench.note(msg)
    if world.world_size == 1:
        bench.note("world size 1: busbw is 0 by nccl-tests' convention (factor (n-1)/n); compare the times")
    if heap and world.rank == 0:
        progress.note(f"symmetric heap {heap / 2**30:.2f} GiB per rank for sizes up to {fmt_bytes(max(sizes))} "
                      "(TRITON_DIST_HEAP_SIZE overrides)")
    for op in args.ops:
        bench.run_op(op, sizes)
    progress.finish()
    rows = [asdict(r) for r in rec.rows]
    path = None if args.smoke else rec.write()
    if world.rank == 0:
        notes = list(bench.notes)
        if args.graph_below and not world.interpreted:
            notes.append(f"sizes below {fmt_bytes(args.graph_below)}: CUDA-graph replay of {args.graph_calls} "
                         "calls; larger: one call per sample")
        report_run(rows, notes, world, args, path, rec.common["run_id"], rec.common["card"], format_tables, plot_rows,
                   default_plot_path)
    triton_dist.finalize()


if __name__ == "__main__":
    main()
