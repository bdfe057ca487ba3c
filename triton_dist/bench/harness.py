"""Benchmark harness shared by every bench: timing across ranks, result rows, the JSON-lines store.

Protocol (DESIGN.md): barrier before each sample, CUDA events around the op on every rank, the *slowest rank's*
median over the samples, p20/p80 for the spread. Rows are appended to ``<out>/<card>.jsonl`` with the keys
``op, shape, dtype, world_size, provider, median_us, p20_us, p80_us, gbps, card, torch, triton, commit, date,
run_id``. GB means 1e9 bytes.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import uuid
from dataclasses import asdict, dataclass

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
    """TRITON_DIST_COMMIT if set (a device checkout's .git may be stale), else git's short HEAD."""
    if os.environ.get("TRITON_DIST_COMMIT"):
        return os.environ["TRITON_DIST_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or os.environ.get("TRITON_DIST_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TRITON_DIST_COMMIT", "unknown")


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


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
    t = torch.tensor(times, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


class Recorder:
    """Collects rows of one run (same ``run_id``) and appends them to ``<out_dir>/<card>.jsonl`` on rank 0."""

    def __init__(self, out_dir: str, world_size: int, rank: int):
        import triton
        self.out_dir = out_dir
        self.rank = rank
        self.world_size = world_size
        self.rows: list[Row] = []
        self.common = dict(card=card_name(), torch=torch.__version__, triton=triton.__version__,
                           commit=git_commit(), date=datetime.date.today().isoformat(),
                           run_id=uuid.uuid4().hex[:12])
        ids = [self.common["run_id"]]
        if dist.is_initialized():
            dist.broadcast_object_list(ids, src=0)
        self.common["run_id"] = ids[0]

    def add(self, op: str, shape: str, dtype: str, provider: str, samples_us: list[float],
            nbytes: float | None = None) -> Row:
        med = _quantile(samples_us, 0.5)
        row = Row(op=op, shape=shape, dtype=dtype, world_size=self.world_size, provider=provider,
                  median_us=round(med, 3), p20_us=round(_quantile(samples_us, 0.2), 3),
                  p80_us=round(_quantile(samples_us, 0.8), 3),
                  gbps=None if nbytes is None else round(nbytes / (med * 1e-6) / 1e9, 2), **self.common)
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

    def table(self) -> str:
        lines = [f"{'op':<12} {'shape':<18} {'provider':<22} {'median_us':>10} {'p20':>9} {'p80':>9} {'GB/s':>8}"]
        for r in self.rows:
            gb = "" if r.gbps is None else f"{r.gbps:.1f}"
            lines.append(f"{r.op:<12} {r.shape:<18} {r.provider:<22} {r.median_us:>10.2f} {r.p20_us:>9.2f} "
                         f"{r.p80_us:>9.2f} {gb:>8}")
        return "\n".join(lines)
