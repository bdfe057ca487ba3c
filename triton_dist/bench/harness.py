"""Benchmark harness shared by every bench: timing across ranks, result rows, the JSON-lines store.

Protocol (DESIGN.md): barrier before each sample, CUDA events around the op on every rank, the *slowest rank's*
median over the samples, p20/p80 for the spread. Rows are appended to ``<out>/<card>.jsonl`` with the keys
``op, shape, dtype, world_size, provider, median_us, p20_us, p80_us, gbps, card, torch, triton, commit, date,
run_id, tflops, shared_gpu``. GB means 1e9 bytes; ``gbps`` is what the bench says it is (busbw for collectives),
``tflops`` the per-rank FLOP rate of compute ops (1e12 FLOP/s), None where it does not apply. ``shared_gpu`` is True
for rows timed in a shared-GPU world (several ranks on one GPU, ``triton-dist run --share-gpus``): those times are
not performance. Rows written before a key existed load with its default (:meth:`Row.from_dict`).

Also here, shared by the benches: :func:`median_ms` (one number, for the tutorials), :func:`time_call` (CUDA-graph
replay or direct timing, wall clock in the CPU world), :func:`agree` (every rank learns which ranks failed a step)
and :class:`Skip`.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    world_size: int
    provider: str
    median_us: float
    p20_us: float
    p80_us: float
    gbps: float | None
    card: str
    torch: str
    triton: str
    commit: str
    date: str
    run_id: str
    tflops: float | None = None
    shared_gpu: bool = False  # timed in a shared-GPU world: not performance

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        """A row from a ``<card>.jsonl`` line: keys added since the line was written take their defaults (an old row
        has no ``tflops`` or ``shared_gpu``), keys this version does not know are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def world_is_shared_gpu() -> bool:
    """True inside a shared-GPU world (several ranks on one GPU); False in any other world or before ``init``."""
    import triton_dist
    return triton_dist.is_initialized() and bool(getattr(triton_dist.current_world(), "shared_gpu", False))


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_slug(name: str | None = None) -> str:
    """File-name form of the card: ``h100``, ``h200``, or the name lowercased with dashes."""
    name = (name or card_name()).lower()
    for known in ("h100", "h200", "b200", "a100"):
        if known in name:
            return known
    return "-".join(name.replace("nvidia", "").split()) or "unknown"


def git_commit() -> str:
    """TRITON_DIST_COMMIT if set (a device checkout's .git may be stale), else git's short HEAD, with ``+dirty`` when
    the checkout has uncommitted changes (the rows then did not come from that commit alone)."""
    if os.environ.get("TRITON_DIST_COMMIT"):
        return os.environ["TRITON_DIST_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        git = dict(cwd=root, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def uniform(shape, seed: int, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Benchmark input: uniform in ``[-scale, scale)``, drawn in fp32 on ``device`` from ``seed``, cast to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(shape, generator=g, device=device, dtype=torch.float32) * 2 - 1
    return (x * scale).to(dtype)


def time_op(fn, *, iters: int = 30, warmup: int = 5, group=None, inner: int = 1,
            sleep_cycles: int = 1_000_000) -> list[float]:
    """Per-sample microseconds of ``fn`` on this rank: barrier, a GPU sleep of ``sleep_cycles`` while the host
    enqueues, event, ``fn`` ``inner`` times, event; the sample is the time per call.

    Returns the samples of the *slowest rank* for each sample index (max over ranks), so the median of the result
    is the slowest rank's median in the sense of DESIGN.md.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        # Keep the GPU busy while the host enqueues the timed launches, so host launch latency is not timed.
        torch.cuda._sleep(sleep_cycles)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    t = torch.tensor(times, dtype=torch.float64)  # CPU: gloo's, in any world (a shared-GPU world has no NCCL)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def median_ms(fn, *, iters: int = 20, group=None) -> float:
    """The slowest rank's median time of ``fn`` in milliseconds (:func:`time_op`'s protocol); GPUs only. What the
    tutorials print next to the baselines."""
    return _quantile(time_op(fn, iters=iters, group=group), 0.5) / 1000.0


class Recorder:
    """Collects rows of one run (same ``run_id``) and appends them to ``<out_dir>/<card>.jsonl`` on rank 0.

    ``shared_gpu`` marks every row (default: whether the current world is a shared-GPU one)."""

    def __init__(self, out_dir: str, world_size: int, rank: int, shared_gpu: bool | None = None):
        import triton
        self.out_dir = out_dir
        self.rank = rank
        self.world_size = world_size
        self.rows: list[Row] = []
        self.shared_gpu = world_is_shared_gpu() if shared_gpu is None else bool(shared_gpu)
        self.common = dict(card=card_name(), torch=torch.__version__, triton=triton.__version__,
                           commit=git_commit(), date=datetime.date.today().isoformat(),
                           run_id=uuid.uuid4().hex[:12], shared_gpu=self.shared_gpu)
        ids = [self.common["run_id"]]
        if dist.is_initialized():
            dist.broadcast_object_list(ids, src=0)
        self.common["run_id"] = ids[0]

    def add(self, op: str, shape: str, dtype: str, provider: str, samples_us: list[float],
            nbytes: float | None = None, flops: float | None = None) -> Row:
        """One row from per-sample microseconds; ``nbytes`` gives ``gbps`` (bytes / median), ``flops`` gives
        ``tflops`` (FLOPs / median, in 1e12 FLOP/s)."""
        med = _quantile(samples_us, 0.5)
        row = Row(op=op, shape=shape, dtype=dtype, world_size=self.world_size, provider=provider,
                  median_us=round(med, 3), p20_us=round(_quantile(samples_us, 0.2), 3),
                  p80_us=round(_quantile(samples_us, 0.8), 3),
                  gbps=None if nbytes is None else round(nbytes / (med * 1e-6) / 1e9, 2),
                  tflops=None if flops is None else round(flops / (med * 1e-6) / 1e12, 2), **self.common)
        self.rows.append(row)
        return row

    def write(self) -> str | None:
        if self.rank != 0:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{card_slug(self.common['card'])}.jsonl")
        with open(path, "a") as f:
            for row in self.rows:
                f.write(json.dumps(asdict(row)) + "\n")
        return path

    def table(self, notes: list[str] | None = None) -> str:
        """The rows as text (the primitives bench's table); a shared-GPU run's header says its times are not
        performance; ``notes`` follow the rows."""
        from .report import SHARED_GPU_MARK
        w = max([22] + [len(r.provider) for r in self.rows])
        lines = [f"{'op':<12} {'shape':<18} {'provider':<{w}} {'median_us':>10} {'p20':>9} {'p80':>9} {'GB/s':>8}"]
        for r in self.rows:
            gb = "" if r.gbps is None else f"{r.gbps:.1f}"
            lines.append(f"{r.op:<12} {r.shape:<18} {r.provider:<{w}} {r.median_us:>10.2f} {r.p20_us:>9.2f} "
                         f"{r.p80_us:>9.2f} {gb:>8}")
        if any(r.shared_gpu for r in self.rows):
            lines.insert(0, f"{self.world_size} ranks {SHARED_GPU_MARK}")
        if notes:
            lines.append("notes:\n" + "\n".join(f"  - {n}" for n in notes))
        return "\n".join(lines)


class Skip(Exception):
    """A provider cannot run this case (recorded as a note, not a failure)."""


def group_errors(errs: list[str | None]) -> list[str]:
    """``["ranks 0,2: message", ...]`` for the ranks whose entry is not None; ``"all ranks"`` when every rank has it."""
    by_msg: dict[str, list[int]] = {}
    for r, e in enumerate(errs):
        if e is not None:
            by_msg.setdefault(e, []).append(r)
    out = []
    for msg, ranks in by_msg.items():
        who = ("all ranks" if len(ranks) == len(errs) > 1 else
               f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks)))
        out.append(f"{who}: {msg}")
    return out


def agree(err: str | None, group) -> list[str]:
    """Every rank learns which ranks failed a step: returns ``["rank r: message", ...]`` (empty: all succeeded)."""
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int32)  # CPU tensor: gloo, even if NCCL is broken
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return []
    errs = [None] * dist.get_world_size(group)
    dist.all_gather_object(errs, err, group=group)
    return group_errors(errs)


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def wall_times(fn, iters: int, group) -> list[float]:
    """CPU world: barrier, wall clock around one call; the slowest rank's samples (plumbing check, not a timing)."""
    fn()
    times = []
    for _ in range(iters):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def time_call(call, *, samples: int, group, gpu: bool, rot: int = 1, graph_calls: int = 0, warmup: int = 5,
              sleep_cycles: int = 1_000_000) -> tuple[list[float], str | None]:
    """Per-call microseconds of ``call(i)`` (the slowest rank's samples) and a note, or None.

    ``call(i)`` runs the op on input set ``i`` (``0 <= i < rot``); successive calls cycle over the sets. In the CPU
    world (``gpu`` False): wall clock, one call per sample. On GPUs with ``graph_calls`` > 0: ``graph_calls``
    back-to-back calls are captured in one CUDA graph (after three warm-up calls on a side stream) and the sample is
    a replay's time divided by ``graph_calls``; if capture fails on any rank, every rank times the calls directly
    and the note says why. Otherwise :func:`time_op`, one call per sample.
    """
    counter = [0]

    def direct():
        call(counter[0] % rot)
        counter[0] += 1

    if not gpu:
        return wall_times(direct, samples, group), None
    note = None
    if graph_calls > 0:
        k = graph_calls
        graph, err = None, None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(3):
                    call(i % rot)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for i in range(k):
                    call(i % rot)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (any capture failure falls back to direct timing)
            graph, err = None, first_line(e)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        failed = agree(err, group)
        if not failed:
            try:
                return [t / k for t in time_op(graph.replay, iters=samples, warmup=2, group=group,
                                               sleep_cycles=sleep_cycles)], None
            finally:
                del graph
        note = f"CUDA-graph capture failed ({'; '.join(failed)}); timed directly instead"
        del graph
    return time_op(direct, iters=samples, warmup=warmup, group=group, sleep_cycles=sleep_cycles), note
