"""AllGather+GEMM, GEMM+ReduceScatter and GEMM+AllReduce against NCCL + cuBLAS: ``triton-dist bench gemm``.

::

    triton-dist bench gemm [-n N] [--ops ag_gemm,gemm_rs,gemm_ar] [--shapes llama3-8b,llama3-70b,qwen2-72b,goal]
                           [--m 1024,2048,4096,8192] [--decode-m 1,16,64,128,256] [--dtype bf16] [--samples 20]
                           [--graph-max-m 256] [--graph-calls 20] [--out DIR] [--plot PATH | --no-plot]
    triton-dist bench gemm -n 2 --mode cpu -- --smoke [--out DIR]      # CPU world: a plumbing check, no timings
    python -m triton_dist.bench.gemm --render bench/results/h100.jsonl [--run-id ID]   # no GPUs needed

Shapes: the MLP of a tensor-parallel transformer layer, hidden size H, intermediate size I, world size w. A row's
``shape`` is ``<family>:M=<M>,N=<N>,K=<K>`` with N and K those of the per-rank GEMM:

=============  ==================================================  =============  ==========
op             what every rank computes                            row N, K       M from
=============  ==================================================  =============  ==========
``ag_gemm``    up projection (column parallel):                    I/w, H         ``--m``
               all_gather(A: M/w x H) @ B: H x I/w -> M x I/w
``gemm_rs``    down projection (row parallel):                     H, I/w         ``--m``
               reduce_scatter(A: M x I/w @ B: I/w x H) -> M/w x H
``gemm_ar``    down projection at decode:                          H, I/w         ``--decode-m``
               all_reduce(A: M x I/w @ B: I/w x H) -> M x H
=============  ==================================================  =============  ==========

Families (H, I): ``llama3-8b`` (4096, 14336), ``llama3-70b`` (8192, 28672), ``qwen2-72b`` (8192, 29568); ``goal``: the
issue's fixed per-rank shapes, ag_gemm M=8192 K=8192 N=7168 and M=4096 K=8192 N=2048, gemm_rs M=8192 K=7168 N=8192
(whatever the world size). A family whose I the world size does not divide, or an M it does not divide (ag_gemm,
gemm_rs), is skipped with a note.

Providers, all in the same run on the same inputs:

* ``triton_dist:<method>``: ``ops.ag_gemm`` (copy_engine, sm, sequential), ``ops.gemm_rs`` (fused,
  sequential_reduce, decomposed, sequential),
  ``ops.gemm_ar`` (fused, sequential); skipped with a note while ``triton_dist.ops`` lacks the op;
* ``nccl+cublas``: one after the other, ``all_gather_into_tensor`` then ``torch.matmul``; ``torch.matmul`` then
  ``reduce_scatter_tensor``; ``torch.matmul`` then ``all_reduce`` (``gloo+torch`` in the CPU world);
* ``torch_symm_mem`` (GPUs): PyTorch's fused ``torch.ops.symm_mem.fused_all_gather_matmul`` and
  ``fused_matmul_reduce_scatter``; for gemm_ar, which PyTorch does not fuse, ``torch_symm_mem:one_shot`` is
  ``torch.matmul`` into a symmetric buffer then ``torch.ops.symm_mem.one_shot_all_reduce``;
* ``gemm_alone``: ``torch.matmul`` of the per-rank GEMM without communication (ag_gemm: the gathered M x K @ B).

In a shared-GPU world (``triton-dist run --share-gpus``: several ranks on one GPU) neither ``nccl+cublas`` (NCCL
refuses two ranks on one GPU; the process group is gloo there) nor ``torch_symm_mem`` runs (:func:`provider_plan`
notes why); ours and ``gemm_alone`` do, a banner says the times are not performance and every row is marked
``shared_gpu``. ``-n 1`` is the no-communication reference.

Tables, one per (op, family): median us and TFLOP/s per rank (2 M N K / time) per provider; ``<baseline>/ours`` =
the baseline's time over our best time (> 1: ours faster); ``ours/gemm`` = our best time over the GEMM alone (1: the
communication costs nothing).

Timing (:func:`harness.time_call`: barrier, GPU sleep while the host enqueues, CUDA events, the slowest rank's median
over ``--samples``): gemm_ar cases with M <= ``--graph-max-m`` are timed as CUDA-graph replays of ``--graph-calls``
calls (time / calls; direct timing with a note if capture fails), everything else one call per sample. When one
input set (A and B of a rank) fits twice in L2, calls cycle over enough sets to cover twice the L2 cache, so weights
come from HBM as they do in a model (:func:`rotation`).

Checks: before timing, every provider's result on input set 0 is compared with an fp32 reference (``torch.matmul`` of
the fp32-upcast inputs; the gather and the sums through torch.distributed in fp32): ``max |got - ref| <= rtol * max
|ref|`` with :func:`gemm_tolerance`. A baseline that fails or is missing is skipped with a note saying why. A
mismatch or an error of ours is noted and not timed, the other providers still run, and the command exits with
status 1 after writing the rows.

Data: A uniform in [-1, 1), B uniform in [-1, 1) / sqrt(K) (outputs of order 1), different on every rank. Rows go
to ``<out>/<card>.jsonl`` (``gbps`` None, ``tflops`` per rank); rank 0 prints the tables and plots
``docs/perf/gemm_<card>.png`` (time vs M per provider, a panel per op and family) when matplotlib is importable.
``--smoke`` runs a tiny family (``smoke``: H=64, I/w=48, M=16w, decode M 1 and 16) in the CPU world in fp16 with
wall-clock times: rows are written only with an explicit ``--out``. Unless ``TRITON_DIST_HEAP_SIZE`` is set, the
symmetric heap is sized for the largest case (:func:`heap_bytes_for`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
import zlib
from dataclasses import asdict, dataclass

from .harness import Skip, agree, first_line, time_call, uniform
from .report import (GEMM_ALONE, GEMM_OPS, OURS, SHARED_GPU_NO_NCCL, SHARED_GPU_NO_SYMM_MEM, Progress, add_render_args,
                     announce_shared_gpu, default_gemm_plot_path, format_gemm_tables, gemm_shape, load_gemm_rows,
                     plot_gemm_rows, render_recorded, report_run)

MODELS = {"llama3-8b": (4096, 14336), "llama3-70b": (8192, 28672), "qwen2-72b": (8192, 29568)}  # (H, I)
GOAL_SHAPES = {"ag_gemm": ((8192, 7168, 8192), (4096, 2048, 8192)), "gemm_rs": ((8192, 8192, 7168),)}  # (M, N, K)
FAMILIES = (*MODELS, "goal")
SMOKE_H, SMOKE_I_PER_RANK = 64, 48
OUR_METHODS = {"ag_gemm": ("copy_engine", "sm", "sequential"),
               "gemm_rs": ("fused", "sequential_reduce", "decomposed", "sequential"),
               "gemm_ar": ("fused", "sequential")}
DEFAULT_M = (1024, 2048, 4096, 8192)
DEFAULT_DECODE_M = (1, 16, 64, 128, 256)
SMOKE_DECODE_M = (1, 16)
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# our op's errors that mean "this case is not supported" rather than "this is broken"
_UNSUPPORTED = (ValueError, TypeError, NotImplementedError, MemoryError)

# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (no world): cases, tolerance, options. Tested without ranks.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``m`` is the full (gathered / unsplit) M; ``n`` and ``k`` those of the per-rank GEMM."""
    op: str
    family: str
    m: int
    n: int
    k: int

    @property
    def shape(self) -> str:
        return gemm_shape(self.family, self.m, self.n, self.k)

    @property
    def flops(self) -> int:
        """FLOPs of the per-rank GEMM (the rows' ``tflops`` divide this by the time)."""
        return 2 * self.m * self.n * self.k

    def input_shapes(self, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) shapes on one rank."""
        a_rows = self.m // world if self.op == "ag_gemm" else self.m
        return (a_rows, self.k), (self.k, self.n)

    def out_shape(self, world: int) -> tuple[int, int]:
        return (self.m // world if self.op == "gemm_rs" else self.m), self.n

    def k_total(self, world: int) -> int:
        """Length of each output element's sum: K, or K x world where partial products are summed over ranks."""
        return self.k if self.op == "ag_gemm" else self.k * world


def build_cases(ops, families, world: int, ms, decode_ms, *, smoke: bool = False) -> tuple[list[Case], list[str]]:
    """The cases of a run in op, family, M order, and notes for what the world size rules out. ``smoke`` replaces
    the families with the tiny ``smoke`` one."""
    cases, notes = [], []
    for op in ops:
        for fam in (("smoke",) if smoke else families):
            if fam == "goal":
                dims = GOAL_SHAPES.get(op, ())
            else:
                h, i = (SMOKE_H, SMOKE_I_PER_RANK * world) if fam == "smoke" else MODELS[fam]
                if i % world:
                    notes.append(f"{op} {fam}: intermediate size {i} is not divisible by {world} ranks; skipped")
                    continue
                sweep = decode_ms if op == "gemm_ar" else ms
                dims = [(m, i // world, h) if op == "ag_gemm" else (m, h, i // world) for m in sweep]
            for m, n, k in dims:
                if op != "gemm_ar" and m % world:
                    notes.append(f"{op} {fam} M={m}: M is not divisible by {world} ranks; skipped")
                    continue
                cases.append(Case(op, fam, m, n, k))
    return cases, notes


def gemm_tolerance(dtype, world: int, k_total: int) -> float:
    """``rtol`` of the checks, relative to ``max |ref|``: ``(world + 2) eps(dtype) + 4 sqrt(k_total) eps(fp32)``.

    The output is rounded to ``dtype`` once (eps/2 of an element <= max |ref|); partial results that cross ranks in
    ``dtype`` (NCCL's ring, staged partials) add up to ``world`` more roundings of values <= max |ref|; fp32
    accumulation in another order differs by about sqrt(K) eps(fp32). A wrong tile, a missing partial or a stale
    chunk is off by a sizeable fraction of max |ref|, far above this.
    """
    import torch
    return (world + 2) * torch.finfo(dtype).eps + 4 * math.sqrt(k_total) * torch.finfo(torch.float32).eps


def compare_gemm(got, ref, *, rtol: float) -> str | None:
    """None if ``got`` is within ``rtol * max |ref|`` of the fp32 ``ref`` everywhere (NaN fails), else what is wrong."""
    import torch
    if tuple(got.shape) != tuple(ref.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = torch.nan_to_num((got.float() - ref).abs(), nan=math.inf)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    lim = rtol * scale
    worst = err.max().item() if err.numel() else 0.0
    if worst <= lim:
        return None
    flat = int(err.reshape(-1).argmax())
    idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), tuple(ref.shape)))
    bad = int((err > lim).sum())
    return (f"{bad} of {err.numel()} elements off by more than {lim:.3g} (rtol {rtol:.3g} x max |ref| {scale:.3g}); "
            f"worst at {idx}: got {got.reshape(-1)[flat].item():.6g}, reference {ref.reshape(-1)[flat].item():.6g}")


def rotation(in_bytes: int, l2_bytes: int, cap: int = 8) -> int:
    """Input sets to cycle over: 1 when one set is at least twice the L2 cache (or there is no cache), else enough
    sets to cover twice the cache, at most ``cap``."""
    if l2_bytes <= 0 or in_bytes <= 0 or in_bytes >= 2 * l2_bytes:
        return 1
    return min(cap, math.ceil(2 * l2_bytes / in_bytes))


def heap_bytes_for(cases: list[Case], world: int, elem: int) -> int:
    """Symmetric heap for the run: 4x the largest staging an op may need (ag_gemm the gathered M x K; gemm_rs the
    fp32 M x N partials; gemm_ar world fp32 M x N slots) plus 256 MiB, at least 4 GiB."""
    need = 0
    for c in cases:
        need = max(need, c.m * c.k * elem if c.op == "ag_gemm" else c.m * c.n * 4 * (world if c.op == "gemm_ar" else 1))
    return max(4 << 30, 4 * need + (256 << 20))


def symm_mem_name(op: str) -> str:
    """The PyTorch symmetric-memory provider of ``op``: fused for ag_gemm and gemm_rs, matmul + one_shot for
    gemm_ar."""
    return "torch_symm_mem:one_shot" if op == "gemm_ar" else "torch_symm_mem"


def provider_plan(ops, *, gpu: bool, shared_gpu: bool = False,
                  host_backend: str = "gloo") -> tuple[dict[str, list[str]], list[str]]:
    """The baseline providers each op runs (ours, present or not in ``triton_dist.ops``, are not listed) and notes
    for the baselines left out.

    The sequence is ``nccl+cublas`` on GPUs and ``<host_backend>+torch`` in the CPU world (a plumbing check there);
    PyTorch's symmetric memory runs on GPUs only; ``gemm_alone`` (single-rank compute) runs everywhere. A shared-GPU
    world (``shared_gpu``: several ranks on one GPU) runs no NCCL (its process group is gloo there, and gloo on one
    GPU is no baseline) and no symmetric memory; the GEMM alone still runs (its rows are marked shared_gpu).
    """
    plan = {}
    for op in ops:
        names = []
        if not shared_gpu:
            names.append("nccl+cublas" if gpu else f"{host_backend}+torch")
            if gpu:
                names.append(symm_mem_name(op))
        names.append(GEMM_ALONE)
        plan[op] = names
    notes = []
    if shared_gpu:
        notes.append(f"nccl+cublas baselines not run: {SHARED_GPU_NO_NCCL}")
        notes.append(f"torch_symm_mem baselines not run: {SHARED_GPU_NO_SYMM_MEM}")
    elif not gpu:
        notes.append("torch_symm_mem: PyTorch's symmetric-memory ops need CUDA; not run in the CPU world")
    return plan, notes


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(vals))


def _choices(allowed):
    def parse(text: str) -> list[str]:
        vals = [v.strip() for v in str(text).split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(vals))
    return parse


# ----------------------------------------------------------------------------------------------------------------
# The benchmark (ranks of a world)
# ----------------------------------------------------------------------------------------------------------------


class _GemmBench:
    def __init__(self, world, rec, args, dtype, progress: Progress, plan: dict[str, list[str]]):
        import torch
        import torch.distributed as dist
        self.world, self.rec, self.args, self.dtype, self.progress = world, rec, args, dtype, progress
        self.plan = plan  # provider_plan's: the baselines of each op
        self.group, self.n = world.group, world.world_size
        self.gpu = not world.interpreted
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.l2 = torch.cuda.get_device_properties(world.device).L2_cache_size if self.gpu else 0
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.step = 0
        # torch >= 2.13 renames all_gather_into_tensor / reduce_scatter_tensor (*_single); same arguments
        self.all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        if self.world.rank == 0:
            self.progress.note(msg)

    def sync(self) -> None:
        import triton_dist
        triton_dist.synchronize()

    def n_providers(self, op: str) -> int:
        from triton_dist import ops
        return len(OUR_METHODS[op]) * hasattr(ops, op) + len(self.plan[op])

    def rand(self, shape, seed: int, scale: float = 1.0):
        return uniform(shape, seed, self.dtype, self.world.device, scale)

    def inputs(self, case: Case) -> list[tuple]:
        """``rot`` input sets (A, B), different on every rank."""
        a_shape, b_shape = case.input_shapes(self.n)
        rot = rotation((math.prod(a_shape) + math.prod(b_shape)) * self.elem, self.l2)
        seed = zlib.crc32(f"{case.op} {case.shape}".encode()) + 1_000_003 * self.world.rank
        return [(self.rand(a_shape, seed + 2 * i), self.rand(b_shape, seed + 2 * i + 1, 1 / math.sqrt(case.k)))
                for i in range(rot)]

    def reference(self, case: Case, a, b):
        """(fp32 result of the op on (a, b), fp32 result of the GEMM alone, the GEMM alone's A for that result)."""
        import torch
        import torch.distributed as dist
        if case.op == "ag_gemm":
            gathered = torch.empty((case.m, case.k), dtype=self.dtype, device=self.world.device)
            self.all_gather(gathered, a, group=self.group)
            ref = gathered.float() @ b.float()
            return ref, ref, gathered
        part = a.float() @ b.float()
        acc = part.clone()
        dist.all_reduce(acc, group=self.group)
        if case.op == "gemm_rs":
            rows = case.m // self.n
            acc = acc[self.world.rank * rows:(self.world.rank + 1) * rows].clone()
        return acc, part, a

    def providers(self, case: Case, sets, alone_a0):
        """``[(provider, ours, setup)]``: ours, then the baselines of ``self.plan``; ``setup()`` returns ``call(i)``
        (runs on input set i, returns the result) and may raise :class:`Skip`."""
        import torch
        import torch.distributed as dist

        from triton_dist import ops
        op, n, group, dev, dtype = case.op, self.n, self.group, self.world.device, self.dtype
        out = []
        fn = getattr(ops, op, None)
        for method in OUR_METHODS[op] if fn is not None else ():  # main() notes a missing op once
            def ours(method=method):
                res = torch.empty(case.out_shape(n), dtype=dtype, device=dev)
                return lambda i: fn(sets[i][0], sets[i][1], method=method, out=res)
            out.append((f"{OURS}:{method}", True, ours))

        def sequence():
            c = torch.empty((case.m, case.n), dtype=dtype, device=dev)
            if op == "ag_gemm":
                gathered = torch.empty((case.m, case.k), dtype=dtype, device=dev)

                def call(i):
                    self.all_gather(gathered, sets[i][0], group=group)
                    return torch.matmul(gathered, sets[i][1], out=c)
                return call
            if op == "gemm_rs":
                res = torch.empty(case.out_shape(n), dtype=dtype, device=dev)

                def call(i):
                    torch.matmul(sets[i][0], sets[i][1], out=c)
                    self.reduce_scatter(res, c, group=group)
                    return res
                return call

            def call(i):
                torch.matmul(sets[i][0], sets[i][1], out=c)
                dist.all_reduce(c, group=group)
                return c
            return call
        out += [(p, False, sequence) for p in self.plan[op] if p.endswith(("+cublas", "+torch"))]

        if symm_mem_name(op) in self.plan[op]:
            def symm():
                import torch.distributed._symmetric_memory as symm_mem
                gname = group.group_name
                if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
                    symm_mem.enable_symm_mem_for_group(gname)  # deprecated, and not needed, from torch 2.11 on
                if op == "ag_gemm":
                    return lambda i: torch.ops.symm_mem.fused_all_gather_matmul(
                        sets[i][0], [sets[i][1]], 0, gname, return_A=False)[1][0]
                if op == "gemm_rs":
                    return lambda i: torch.ops.symm_mem.fused_matmul_reduce_scatter(sets[i][0], sets[i][1], "sum", 0,
                                                                                   gname)
                buf = symm_mem.empty((case.m, case.n), dtype=dtype, device=dev)
                symm_mem.rendezvous(buf, gname)

                def call(i):
                    torch.matmul(sets[i][0], sets[i][1], out=buf)
                    return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", gname)
                return call
            out.append((symm_mem_name(op), False, symm))

        def alone():
            c = torch.empty((case.m, case.n), dtype=dtype, device=dev)
            if op == "ag_gemm":  # the gathered A for set 0 (so the result can be checked), random for the others
                lhs = [alone_a0] + [self.rand((case.m, case.k), 17 + i) for i in range(1, len(sets))]
            else:
                lhs = [s[0] for s in sets]
            return lambda i: torch.matmul(lhs[i], sets[i][1], out=c)
        if GEMM_ALONE in self.plan[op]:
            out.append((GEMM_ALONE, False, alone))
        return out

    def run_case(self, case: Case) -> None:
        sets = self.inputs(case)
        ref, alone_ref, alone_a0 = self.reference(case, *sets[0])
        rtol = gemm_tolerance(self.dtype, self.n, case.k_total(self.n))
        alone_rtol = gemm_tolerance(self.dtype, 1, case.k)
        self.sync()
        for provider, ours, setup in self.providers(case, sets, alone_a0):
            self.step += 1
            if self.world.rank == 0:
                self.progress.update(self.step, f"{case.op} {case.shape} {provider}")
            if provider == GEMM_ALONE:
                self.one(case, provider, ours, setup, alone_ref, alone_rtol, len(sets))
            else:
                self.one(case, provider, ours, setup, ref, rtol, len(sets))
        del sets, ref, alone_ref, alone_a0
        if self.gpu:
            import torch
            torch.cuda.empty_cache()

    def one(self, case: Case, provider: str, ours: bool, setup, ref, rtol: float, rot: int) -> None:
        err, call = None, None
        try:
            call = setup()
            got = call(0)
            self.sync()
            err = compare_gemm(got, ref, rtol=rtol)
            err = None if err is None else f"{'MISMATCH ' if ours else ''}{err}"
            del got
        except Skip as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001  (recorded, the other providers still run)
            err = first_line(e)
            if ours and not isinstance(e, _UNSUPPORTED):
                err = f"ERROR {err}"
                print(f"rank {self.world.rank}: {case.op} {case.shape} {provider} raised:\n{traceback.format_exc()}",
                      file=sys.stderr)
        failed = agree(err, self.group)
        if failed:
            msg = f"{case.op} {case.shape} {provider}: not timed ({'; '.join(failed)})"
            if ours and any(f.split(": ", 1)[-1].startswith(("MISMATCH", "ERROR")) for f in failed):
                self.failures.append(msg)
            self.note(msg)
            return
        args = self.args
        graph = args.graph_calls if case.op == "gemm_ar" and case.m <= args.graph_max_m else 0
        samples, note = time_call(call, samples=args.samples, group=self.group, gpu=self.gpu, rot=rot,
                                  graph_calls=graph)
        if note:
            self.note(f"{case.op} {case.shape} {provider}: {note}")
        self.rec.add(case.op, case.shape, str(self.dtype).replace("torch.", ""), provider, samples, flops=case.flops)
        del call
        self.sync()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triton-dist bench gemm", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="directory of <card>.jsonl [default: bench/results; with --smoke: write nothing]")
    ap.add_argument("--ops", type=_choices(GEMM_OPS), default=list(GEMM_OPS),
                    help="comma-separated subset of " + ",".join(GEMM_OPS))
    ap.add_argument("--shapes", type=_choices(FAMILIES), default=list(FAMILIES),
                    help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--m", type=_int_list, default=None,
                    help=f"M of ag_gemm and gemm_rs [default: {','.join(map(str, DEFAULT_M))}; --smoke: 16 x world]")
    ap.add_argument("--decode-m", type=_int_list, default=None,
                    help=f"M of gemm_ar [default: {','.join(map(str, DEFAULT_DECODE_M))}; --smoke: "
                         f"{','.join(map(str, SMOKE_DECODE_M))}]")
    ap.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None, help="[default: bf16; --smoke: fp16]")
    ap.add_argument("--samples", type=int, default=None, help="timed samples per case and provider [default: 20; "
                                                              "--smoke: 2]")
    ap.add_argument("--graph-max-m", type=int, default=256,
                    help="gemm_ar cases with M up to this are timed by CUDA-graph replay (0: never)")
    ap.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, allowed in the CPU world (wall-clock timing): checks the plumbing only")
    add_render_args(ap, "docs/perf/gemm_<card>.png")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_gemm_rows, format_gemm_tables, plot_gemm_rows, default_gemm_plot_path)
        return
    if args.samples is not None and args.samples < 1 or args.graph_calls < 1:
        ap.error("--samples and --graph-calls must be positive")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.samples = args.samples or (2 if args.smoke else 20)
    args.dtype = args.dtype or ("fp16" if args.smoke else "bf16")
    ms = args.m or ([16 * world_size] if args.smoke else list(DEFAULT_M))
    decode_ms = args.decode_m or list(SMOKE_DECODE_M if args.smoke else DEFAULT_DECODE_M)
    cases, skipped = build_cases(args.ops, args.shapes, world_size, ms, decode_ms, smoke=args.smoke)

    import torch

    import triton_dist
    from triton_dist.bench.harness import Recorder
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    heap = None
    gpu_expected = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if gpu_expected and not os.environ.get("TRITON_DIST_HEAP_SIZE") and \
            os.environ.get("TRITON_DIST_BACKEND", "auto").lower() in ("auto", "cuda"):
        heap = heap_bytes_for(cases, world_size, torch.empty((), dtype=dtype).element_size())
    world = triton_dist.init(heap_size=heap)
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench gemm needs GPUs (the CPU world has no meaningful timings; --smoke runs "
                         "tiny shapes there as a plumbing check)")
    if world.interpreted and dtype == torch.bfloat16:
        raise SystemExit("--dtype bf16 in the CPU world: Triton's interpreter computes bf16 tl.dot wrongly; use fp16 "
                         "or fp32")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    plan, plan_notes = provider_plan(args.ops, gpu=not world.interpreted, shared_gpu=world.shared_gpu,
                                     host_backend=world.host_backend)
    progress = Progress(0, enabled=world.rank == 0)
    bench = _GemmBench(world, rec, args, dtype, progress, plan)
    progress.total = sum(bench.n_providers(c.op) for c in cases)
    for msg in skipped:
        bench.note(msg)
    from triton_dist import ops
    for op in args.ops:
        if not hasattr(ops, op):
            bench.note(f"{op}: triton_dist.ops has no {op} yet; only the baselines run")
    for msg in plan_notes:
        bench.note(msg)
    if heap and world.rank == 0:
        progress.note(f"symmetric heap {heap / 2**30:.2f} GiB per rank (TRITON_DIST_HEAP_SIZE overrides)")

    for i, case in enumerate(cases):
        bench.run_case(case)
        if i + 1 == len(cases) or cases[i + 1].op != case.op:
            release = getattr(ops, "release_contexts", None)
            if release is not None:
                release()  # the next op's contexts start from an empty heap
    progress.finish()
    rows = [asdict(r) for r in rec.rows]
    path = rec.write() if (args.out or not args.smoke) else None
    if world.rank == 0:
        notes = list(bench.notes)
        if args.graph_max_m and not world.interpreted:
            notes.append(f"gemm_ar with M <= {args.graph_max_m}: CUDA-graph replay of {args.graph_calls} calls; "
                         "the rest one call per sample")
        report_run(rows, notes, world, args, path, rec.common["run_id"], rec.common["card"], format_gemm_tables,
                   plot_gemm_rows, default_gemm_plot_path)
        if bench.failures:
            print("FAILED: our result differs from the reference or our op raised:\n  "
                  + "\n  ".join(bench.failures), file=sys.stderr)
    sys.stdout.flush()  # a failing world's launcher stops the ranks as soon as one exits: flush before
    sys.stderr.flush()
    triton_dist.finalize()
    if bench.failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
