"""Reporting of benchmark rows: progress bar, per-op tables with ratios, plots, reading rows back.

Works on plain row dicts (``<card>.jsonl`` lines), so everything here runs without GPUs. Collective rows (shape
``nbytes=<S>``) and GEMM rows (shape ``<family>:M=<M>,N=<N>,K=<K>``, see :mod:`triton_dist.bench.gemm`) share the file
and are told apart by op and shape.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
OURS = "triton_dist"
DEFAULT_PLOT = os.path.join("docs", "perf", "collectives_{card}.png")

# ----------------------------------------------------------------------------------------------------------------
# Shared-GPU worlds (several ranks on one GPU, `triton-dist run --share-gpus`): their times are not performance
# ----------------------------------------------------------------------------------------------------------------

SHARED_GPU_MARK = "(shared GPU: not performance)"
# why the benches run no NCCL / PyTorch symmetric-memory baseline there (their skip notes say so)
SHARED_GPU_NO_NCCL = ("NCCL refuses two ranks on one GPU, so a shared-GPU world's process group is gloo, and gloo on "
                      "one GPU is no baseline")
SHARED_GPU_NO_SYMM_MEM = "PyTorch's symmetric memory refuses ranks that share a GPU"


def shared_gpu_banner(world_size: int, ranks_per_device: int, *, mps: bool = False,
                      num_sms: int | None = None) -> str:
    """What every bench prints first in a shared-GPU world (rank 0, once): its times are not performance."""
    where = "on one GPU" if ranks_per_device >= world_size else f"sharing GPUs, {ranks_per_device} per GPU"
    how = ["MPS on: the ranks run concurrently" if mps else "no MPS: the ranks time-slice the GPU"]
    if num_sms:
        how.append(f"persistent grids of {num_sms} SMs per rank")
    rule = "=" * 100
    return "\n".join([
        rule,
        f"SHARED-GPU WORLD: {world_size} ranks {where} ({'; '.join(how)}).",
        "Timings here are not performance: the ranks compete for one GPU. NCCL and torch symmetric-memory baselines",
        "are skipped; every row is marked \"shared_gpu\": true. For performance run one rank per GPU; `-n 1` is the",
        "no-communication reference.",
        rule])


def announce_shared_gpu(world, stream=None) -> str | None:
    """In a shared-GPU world, print :func:`shared_gpu_banner` on rank 0 (to ``stream``, default stdout) and return it
    (on every rank); None in any other world."""
    if not getattr(world, "shared_gpu", False):
        return None
    text = shared_gpu_banner(world.world_size, getattr(world, "ranks_per_device", world.world_size),
                             mps=bool(getattr(world, "mps", False)), num_sms=getattr(world, "num_sms", None))
    if world.rank == 0:
        stream = stream if stream is not None else sys.stdout
        stream.write(text + "\n\n")
        stream.flush()
    return text


def _shared(rows) -> bool:
    return any(r.get("shared_gpu") for r in rows)


def _mark(title: str, shared: bool) -> str:
    return f"{title}  {SHARED_GPU_MARK}" if shared and SHARED_GPU_MARK not in title else title


def plot_title(rows: list[dict], title: str) -> tuple[str, dict]:
    """A plot's title and its text style: with :data:`SHARED_GPU_MARK` (in red) when a row is from a shared-GPU
    world."""
    shared = _shared(rows)
    return _mark(title, shared), ({"color": "red"} if shared else {})


def fmt_bytes(n: int) -> str:
    """``4096`` -> ``4 KiB``; ``3 << 20`` -> ``3 MiB``; non-multiples keep bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def progress_line(done: int, total: int, label: str = "", width: int = 30) -> str:
    """``[#####.....] 12/54 all_reduce 64 KiB``."""
    total = max(total, 1)
    filled = min(width, (width * done) // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}" + (f" {label}" if label else "")


class Progress:
    """A dependency-free progress bar on ``stream`` (stderr): redrawn in place on a terminal, one line per update
    otherwise; ``note`` prints a message above it."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.label, self._last = 0, "", 0

    def _draw(self) -> None:
        line = progress_line(self.done, self.total, self.label, self.width)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._last))
            self._last = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, done: int, label: str = "") -> None:
        self.done, self.label = done, label
        if self.enabled:
            self._draw()

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._last + "\r")
        self.stream.write(f"note: {msg}\n")
        if self.tty and self._last:
            self._draw()
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _size_of(row: dict) -> int:
    shape = row["shape"]
    if not shape.startswith("nbytes="):
        raise ValueError(f"row shape {shape!r} is not nbytes=<bytes>")
    return int(shape.split("=", 1)[1])


def _family(provider: str) -> str:
    return provider.split(":", 1)[0]


def summarize(rows: list[dict]) -> dict:
    """``{op: {"sizes": [...], "providers": [...], "cells": {(size, provider): row}, "world": n, "dtype": str,
    "shared_gpu": bool}}``; ops in OPS order, providers ours first (in order of appearance), a later duplicate row
    replaces an earlier one; ``shared_gpu``: some row was timed in a shared-GPU world (rows without the key: not)."""
    out: dict = {}
    for r in rows:
        d = out.setdefault(r["op"], {"sizes": [], "providers": [], "cells": {}, "world": r["world_size"],
                                     "dtype": r["dtype"], "shared_gpu": False})
        d["shared_gpu"] = d["shared_gpu"] or bool(r.get("shared_gpu"))
        s = _size_of(r)
        if s not in d["sizes"]:
            d["sizes"].append(s)
        if r["provider"] not in d["providers"]:
            d["providers"].append(r["provider"])
        d["cells"][(s, r["provider"])] = r
    for d in out.values():
        d["sizes"].sort()
        seen = list(d["providers"])
        d["providers"].sort(key=lambda p: (_family(p) != OURS, seen.index(p)))
    order = {op: i for i, op in enumerate(OPS)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _fmt_us(us: float) -> str:
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def _fmt_gbps(g: float) -> str:
    return f"{g:.2f}" if g < 10 else f"{g:.1f}"


def ratios(d: dict, size: int) -> tuple[str | None, dict[str, float]]:
    """For one op summary and size: our fastest provider, and per baseline family its best time / our best time
    (> 1: ours is faster)."""
    cells = {p: d["cells"][(size, p)] for p in d["providers"] if (size, p) in d["cells"]}
    ours = {p: r["median_us"] for p, r in cells.items() if _family(p) == OURS}
    if not ours:
        return None, {}
    best = min(ours, key=ours.get)
    fams: dict[str, float] = {}
    for p, r in cells.items():
        f = _family(p)
        if f != OURS:
            fams[f] = min(fams.get(f, math.inf), r["median_us"])
    return best, {f: t / ours[best] for f, t in fams.items()}


def _layout(title: str, cols: list[tuple[str, str, list[str]]], nrows: int) -> str:
    """A text table: ``cols`` are ``(header 1, header 2, values)``; the first is the row label (left-aligned). A
    column whose header 2 is ``"us"`` and the one after it share one header 1 (a provider's time and rate)."""
    # a provider name (h1 of a "us" column) spans its "us" and rate columns: it does not size "us" alone
    widths = [max(len(h2), *(len(v) for v in vals), 0 if h2 == "us" else len(h1)) for h1, h2, vals in cols]
    head1, head2 = [], []
    i = 0
    while i < len(cols):
        h1, h2, _ = cols[i]
        if h2 == "us":
            span = widths[i] + 2 + widths[i + 1]
            if len(h1) > span:
                extra = len(h1) - span
                widths[i] += extra // 2
                widths[i + 1] += extra - extra // 2
                span = len(h1)
            head1.append(h1.center(span))
            head2.append(h2.rjust(widths[i]) + "  " + cols[i + 1][1].rjust(widths[i + 1]))
            i += 2
        else:
            head1.append(h1.rjust(widths[i]))
            head2.append(h2.rjust(widths[i]) if i else h2.ljust(widths[i]))
            i += 1
    lines = [title, " | ".join(head1), " | ".join(head2)]
    lines.append("-" * len(lines[-1]))
    for k in range(nrows):
        cells, i = [], 0
        while i < len(cols):
            h1, h2, vals = cols[i]
            if h2 == "us":
                cells.append(vals[k].rjust(widths[i]) + "  " + cols[i + 1][2][k].rjust(widths[i + 1]))
                i += 2
            else:
                cells.append(vals[k].ljust(widths[i]) if i == 0 else vals[k].rjust(widths[i]))
                i += 1
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def format_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """One text table per op: size; median us and busbw GB/s per provider; our fastest method; each baseline
    family's best time divided by ours (no such column without baseline rows). A table with shared-GPU rows says
    in its title that its times are not performance (:data:`SHARED_GPU_MARK`)."""
    blocks = []
    for op, d in summarize(rows).items():
        fams = list(dict.fromkeys(_family(p) for p in d["providers"] if _family(p) != OURS))
        cols = [("", "size", [fmt_bytes(s) for s in d["sizes"]])]
        for p in d["providers"]:
            us, gb = [], []
            for s in d["sizes"]:
                r = d["cells"].get((s, p))
                us.append("-" if r is None else _fmt_us(r["median_us"]))
                gb.append("-" if r is None or r.get("gbps") is None else _fmt_gbps(r["gbps"]))
            cols.append((p, "us", us))
            cols.append(("", "GB/s", gb))
        per_size = [ratios(d, s) for s in d["sizes"]]
        if any(b for b, _ in per_size):
            cols.append(("best", "ours", ["-" if b is None else b.split(":", 1)[-1] for b, _ in per_size]))
        for f in fams:
            cols.append((f"{f}", "/ours", ["-" if f not in rt else f"{rt[f]:.2f}" for _, rt in per_size]))
        title = (f"{op}  ({d['world']} ranks, {d['dtype']}; median us, busbw GB/s; <baseline>/ours = baseline "
                 f"time / our best time, > 1: ours faster)")
        title = _mark(title, d["shared_gpu"])
        blocks.append(_layout(title, cols, len(d["sizes"])))
    if notes:
        blocks.append("notes:\n" + "\n".join(f"  - {n}" for n in notes))
    return "\n\n".join(blocks)


def _style(provider: str) -> dict:
    fam = _family(provider)
    if fam == OURS:
        return dict(linestyle="-", marker="o", linewidth=2.0)
    if fam.startswith(("nccl", "gloo")):
        return dict(linestyle="--", marker="s", linewidth=1.5)
    if fam == GEMM_ALONE:
        return dict(linestyle="-.", marker="x", linewidth=1.5)
    return dict(linestyle=":", marker="^", linewidth=1.5)


def plot_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """Two panels per op (latency vs size, log-log; busbw vs size), one line per provider, saved as PNG at ``path``.
    Returns the path, or None (with a printed note) when matplotlib is not importable or there are no rows."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        print(f"note: matplotlib is not importable, so no plot was drawn ({path} skipped); "
              "`pip install matplotlib` and rerun with --render to draw it")
        return None
    summary = summarize(rows)
    if not summary:
        print(f"note: no collective rows to plot ({path} skipped)")
        return None
    providers = list(dict.fromkeys(p for d in summary.values() for p in d["providers"]))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig = Figure(figsize=(13, 3.8 * len(summary)), layout="constrained")
    axes = fig.subplots(len(summary), 2, squeeze=False)
    for (op, d), (ax_t, ax_b) in zip(summary.items(), axes):
        for p in d["providers"]:
            pts = [(s, d["cells"][(s, p)]) for s in d["sizes"] if (s, p) in d["cells"]]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax_t.plot(xs, [r["median_us"] for _, r in pts], label=p, color=colors[p], **_style(p))
            bw = [(s, r["gbps"]) for s, r in pts if r.get("gbps") is not None]
            if bw:
                ax_b.plot([s for s, _ in bw], [g for _, g in bw], label=p, color=colors[p], **_style(p))
        for ax, what in ((ax_t, "latency (median us)"), (ax_b, "bus bandwidth (GB/s)")):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(d["sizes"]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([fmt_bytes(s).replace(" ", "") for s in d["sizes"]], rotation=0, fontsize=8)
            ax.set_xlabel("per-rank message size S")
            ax.set_ylabel(what)
            ax.set_title(f"{op}: {what.split(' (')[0]} ({d['world']} ranks, {d['dtype']})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        ax_b.set_ylim(bottom=0)
        ax_t.legend(fontsize=8)
    if title is None:
        r0 = rows[0]
        title = (f"{r0.get('card', '?')}: collectives, busbw by nccl-tests' conventions "
                 f"(commit {r0.get('commit', '?')}, {r0.get('date', '?')}, run {r0.get('run_id', '?')})")
    title, style = plot_title(rows, title)
    fig.suptitle(title, fontsize=11, **style)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _load(path: str, keep, what: str, run_id: str | None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if keep(r):
                    rows.append(r)
    if not rows:
        raise ValueError(f"{path} holds no {what} rows")
    run_id = run_id or rows[-1]["run_id"]
    picked = [r for r in rows if r["run_id"] == run_id]
    if not picked:
        raise ValueError(f"{path} has no {what} rows of run {run_id!r}")
    return picked


def load_runs(path: str, keep, run_id: str | None = None) -> list[dict]:
    """The rows of a ``<card>.jsonl`` that ``keep`` accepts, of the runs ``run_id`` (one id or a comma-separated
    list; default every run), in file order (a later row of the same cell replaces an earlier one downstream)."""
    runs = set(run_id.split(",")) if run_id else None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if keep(r) and (runs is None or r.get("run_id") in runs)]


def plot_ratio_panels(panels, path: str, title: str, rows: list[dict]) -> str:
    """One horizontal-bar panel per ``(name, labels, ratios, goal, baseline)``: a bar per label of ours / baseline
    time, green where at most ``goal``, the goal as a dashed line. Saved as PNG at ``path`` (needs matplotlib)."""
    from matplotlib.figure import Figure
    heights = [0.22 * len(labels) + 1.2 for _, labels, _, _, _ in panels]
    fig = Figure(figsize=(12, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (name, labels, ratios, goal, baseline) in zip(axes, panels):
        ax.barh(range(len(labels)), ratios, color=["tab:green" if x <= goal else "tab:red" for x in ratios])
        ax.axvline(goal, color="k", lw=1, ls="--", label=f"goal {goal:.4g}")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(min(0.5, min(ratios) - 0.05), max(1.3, max(ratios) + 0.05))
        ax.set_xlabel(f"time of ours / {baseline} (< 1: ours faster)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    title, style = plot_title(rows, title)
    fig.suptitle(title, fontsize=10, **style)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_pair_tables(pairs: dict, goal: dict, baseline, rate, width: int, notes=None) -> str:
    """The ratio tables of a bench that pairs each of our providers with a baseline: ``pairs`` ``{op: {label:
    (ours_us, baseline_us, our_row)}}``, ``goal[op]`` the largest ours / baseline time that meets it,
    ``baseline(op)`` its name, ``rate(op, row)`` the line's rate column (with its leading spaces, or ""),
    ``width`` the label column's. A line per label, ``*`` where the goal is missed; then the notes."""
    lines = []
    for op, shapes in pairs.items():
        met = sum(1 for o, b, _ in shapes.values() if o / b <= goal[op])
        lines.append(f"{op}: ours / {baseline(op)} time (goal <= {goal[op]:.4g}): {met} of {len(shapes)} met")
        for shape, (o, b, r) in shapes.items():
            lines.append(f"  {shape:<{width}} {o:10.1f} us {b:10.1f} us  x{o / b:6.3f}{rate(op, r)}"
                         f"{'' if o / b <= goal[op] else '  *'}")
    lines.extend(f"note: {n}" for n in notes or ())
    return "\n".join(lines)


def plot_pairs(pairs: dict, rows: list[dict], path: str, goal: dict, baseline, what: str,
               title: str | None = None) -> str | None:
    """:func:`plot_ratio_panels` of :func:`format_pair_tables`' ``pairs``: one panel per op; the default title names
    the card, ``what`` and the date of the last row. None (with a printed note) without matplotlib or pairs."""
    if not have_matplotlib(path):
        return None
    if not pairs:
        print(f"note: no {what} rows to plot ({path} skipped)")
        return None
    panels = [(op, list(shapes), [o / b for o, b, _ in shapes.values()], goal[op], baseline(op))
              for op, shapes in pairs.items()]
    r0 = rows[-1]
    return plot_ratio_panels(panels, path, title or f"{r0.get('card', '?')}: {what} ({r0.get('date', '?')})", rows)


def card_plot_path(template: str, card: str) -> str:
    """``template`` (a path with ``{card}``) for ``card``'s slug."""
    from .harness import card_slug
    return template.format(card=card_slug(card))


def have_matplotlib(path: str) -> bool:
    """Whether matplotlib imports; prints why ``path`` is skipped when not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"note: matplotlib is not importable, so no plot was drawn ({path} skipped); "
              "`pip install matplotlib` and rerun with --render to draw it")
        return False
    return True


def load_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The collective rows of one run in a ``<card>.jsonl`` (default: the last run in the file that has some)."""
    return _load(path, lambda r: r.get("op") in OPS and str(r.get("shape", "")).startswith("nbytes="), "collective",
                 run_id)


def default_plot_path(card: str) -> str:
    from triton_dist.bench.harness import card_slug
    return DEFAULT_PLOT.format(card=card_slug(card))


# ----------------------------------------------------------------------------------------------------------------
# GEMM rows (triton_dist.bench.gemm): tables per (op, shape family) over M, time vs M plots
# ----------------------------------------------------------------------------------------------------------------

GEMM_OPS = ("ag_gemm", "gemm_rs", "gemm_ar")
GEMM_ALONE = "gemm_alone"
DEFAULT_GEMM_PLOT = os.path.join("docs", "perf", "gemm_{card}.png")
# What M, N, K of a GEMM row are, per op (N and K are the per-rank GEMM's; M is never split in the row)
GEMM_LAYOUTS = {"ag_gemm": "all_gather(A: M/world x K per rank) @ B: K x N per rank -> M x N",
                "gemm_rs": "reduce_scatter(A: M x K per rank @ B: K x N per rank) -> M/world x N",
                "gemm_ar": "all_reduce(A: M x K per rank @ B: K x N per rank) -> M x N"}
_GEMM_SHAPE_RE = re.compile(r"^(?P<family>[\w.\-]+):M=(?P<m>\d+),N=(?P<n>\d+),K=(?P<k>\d+)$")


def gemm_shape(family: str, m: int, n: int, k: int) -> str:
    """The ``shape`` of a GEMM row: ``llama3-70b:M=8192,N=7168,K=8192``."""
    return f"{family}:M={m},N={n},K={k}"


def parse_gemm_shape(shape: str) -> tuple[str, int, int, int]:
    """``"llama3-70b:M=8192,N=7168,K=8192"`` -> ``("llama3-70b", 8192, 7168, 8192)``."""
    mt = _GEMM_SHAPE_RE.match(shape)
    if not mt:
        raise ValueError(f"row shape {shape!r} is not <family>:M=<M>,N=<N>,K=<K>")
    return mt["family"], int(mt["m"]), int(mt["n"]), int(mt["k"])


def is_gemm_row(row: dict) -> bool:
    return row.get("op") in GEMM_OPS and _GEMM_SHAPE_RE.match(str(row.get("shape", ""))) is not None


def summarize_gemm(rows: list[dict]) -> dict:
    """``{(op, family): {"ms": [...], "n": N, "k": K, "providers": [...], "cells": {(M, provider): row}, "world",
    "dtype", "shared_gpu"}}``; ops in GEMM_OPS order, families in order of appearance, providers ours first, GEMM
    alone last; a later duplicate row replaces an earlier one."""
    out: dict = {}
    for r in rows:
        fam, m, n, k = parse_gemm_shape(r["shape"])
        d = out.setdefault((r["op"], fam), {"ms": [], "n": n, "k": k, "providers": [], "cells": {},
                                            "world": r["world_size"], "dtype": r["dtype"], "shared_gpu": False})
        d["shared_gpu"] = d["shared_gpu"] or bool(r.get("shared_gpu"))
        if m not in d["ms"]:
            d["ms"].append(m)
        if r["provider"] not in d["providers"]:
            d["providers"].append(r["provider"])
        d["cells"][(m, r["provider"])] = r
    for d in out.values():
        d["ms"].sort()
        seen = list(d["providers"])
        d["providers"].sort(key=lambda p: (0 if _family(p) == OURS else 2 if p == GEMM_ALONE else 1, seen.index(p)))
    order = {op: i for i, op in enumerate(GEMM_OPS)}
    fams = list(dict.fromkeys(f for _, f in out))
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], len(order)), fams.index(kv[0][1]))))


def gemm_ratios(d: dict, m: int) -> tuple[str | None, dict[str, float], float | None]:
    """For one (op, family) summary and M: our fastest provider, per baseline family its best time / our best time
    (> 1: ours faster), and our best time / GEMM alone (the price of the communication; 1 is perfect overlap)."""
    cells = {p: d["cells"][(m, p)] for p in d["providers"] if (m, p) in d["cells"]}
    ours = {p: r["median_us"] for p, r in cells.items() if _family(p) == OURS}
    if not ours:
        return None, {}, None
    best = min(ours, key=ours.get)
    fams: dict[str, float] = {}
    for p, r in cells.items():
        f = _family(p)
        if f != OURS and p != GEMM_ALONE:
            fams[f] = min(fams.get(f, math.inf), r["median_us"])
    alone = cells.get(GEMM_ALONE)
    over_gemm = None if alone is None else ours[best] / alone["median_us"]
    return best, {f: t / ours[best] for f, t in fams.items()}, over_gemm


def format_gemm_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """One text table per (op, shape family): M; median us and per-rank TFLOP/s per provider; our fastest method;
    each baseline family's best time / ours; ours / GEMM alone (columns without their rows are left out). A table
    with shared-GPU rows says in its title that its times are not performance (:data:`SHARED_GPU_MARK`)."""
    blocks = []
    for (op, fam), d in summarize_gemm(rows).items():
        baselines = list(dict.fromkeys(_family(p) for p in d["providers"] if _family(p) != OURS and p != GEMM_ALONE))
        cols = [("", "M", [str(m) for m in d["ms"]])]
        for p in d["providers"]:
            us, tf = [], []
            for m in d["ms"]:
                r = d["cells"].get((m, p))
                us.append("-" if r is None else _fmt_us(r["median_us"]))
                tf.append("-" if r is None or r.get("tflops") is None else f"{r['tflops']:.1f}")
            cols.append((p, "us", us))
            cols.append(("", "TFLOP/s", tf))
        per_m = [gemm_ratios(d, m) for m in d["ms"]]
        if any(b for b, _, _ in per_m):
            cols.append(("best", "ours", ["-" if b is None else b.split(":", 1)[-1] for b, _, _ in per_m]))
            for f in baselines:
                cols.append((f, "/ours", ["-" if f not in rt else f"{rt[f]:.2f}" for _, rt, _ in per_m]))
            if any(g is not None for _, _, g in per_m):
                cols.append(("ours", "/gemm", ["-" if g is None else f"{g:.2f}" for _, _, g in per_m]))
        title = (f"{op} {fam}: N={d['n']} K={d['k']}, {GEMM_LAYOUTS.get(op, '')}  ({d['world']} ranks, "
                 f"{d['dtype']}; median us, TFLOP/s per rank; <baseline>/ours > 1: ours faster; ours/gemm: our best "
                 "time over the GEMM alone)")
        title = _mark(title, d["shared_gpu"])
        blocks.append(_layout(title, cols, len(d["ms"])))
    if notes:
        blocks.append("notes:\n" + "\n".join(f"  - {n}" for n in notes))
    return "\n\n".join(blocks)


def plot_gemm_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """Time vs M (log-log), one line per provider, one panel per (op, shape family): a row of panels per op. Saved
    as PNG at ``path``; returns the path, or None (with a printed note) without matplotlib or rows."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        print(f"note: matplotlib is not importable, so no plot was drawn ({path} skipped); "
              "`pip install matplotlib` and rerun with --render to draw it")
        return None
    summary = summarize_gemm(rows)
    if not summary:
        print(f"note: no GEMM rows to plot ({path} skipped)")
        return None
    ops = list(dict.fromkeys(op for op, _ in summary))
    ncols = max(sum(1 for o, _ in summary if o == op) for op in ops)
    providers = list(dict.fromkeys(p for d in summary.values() for p in d["providers"]))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig = Figure(figsize=(4.2 * ncols + 1, 3.6 * len(ops)), layout="constrained")
    axes = fig.subplots(len(ops), ncols, squeeze=False)
    used = set()
    for op_i, op in enumerate(ops):
        for col, ((_, fam), d) in enumerate((key, d) for key, d in summary.items() if key[0] == op):
            ax = axes[op_i][col]
            used.add((op_i, col))
            for p in d["providers"]:
                pts = [(m, d["cells"][(m, p)]["median_us"]) for m in d["ms"] if (m, p) in d["cells"]]
                if pts:
                    style = dict(color=colors[p], **_style(p))
                    ax.plot([m for m, _ in pts], [t for _, t in pts], label=p, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(d["ms"]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(m) for m in d["ms"]], fontsize=8)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("median us")
            ax.set_title(f"{op} {fam} (N={d['n']}, K={d['k']})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    for op_i in range(len(ops)):
        for col in range(ncols):
            if (op_i, col) not in used:
                axes[op_i][col].set_axis_off()
    if title is None:
        r0 = rows[0]
        title = (f"{r0.get('card', '?')}: GEMM + communication, {r0.get('world_size', '?')} ranks, "
                 f"{r0.get('dtype', '?')} (commit {r0.get('commit', '?')}, {r0.get('date', '?')}, "
                 f"run {r0.get('run_id', '?')})")
    title, style = plot_title(rows, title)
    fig.suptitle(title, fontsize=11, **style)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def load_gemm_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The GEMM rows of one run in a ``<card>.jsonl`` (default: the last run in the file that has some)."""
    return _load(path, is_gemm_row, "GEMM", run_id)


def default_gemm_plot_path(card: str) -> str:
    from triton_dist.bench.harness import card_slug
    return DEFAULT_GEMM_PLOT.format(card=card_slug(card))


def add_render_args(ap, plot_default: str) -> None:
    """The options every benchmark shares for its plot and for re-rendering a recorded run."""
    ap.add_argument("--plot", default=None, help=f"PNG path [default: {plot_default}]")
    ap.add_argument("--no-plot", action="store_true", help="draw no plot")
    ap.add_argument("--render", metavar="JSONL", default=None,
                    help="no benchmark: print the tables and draw the plot of a recorded run, then exit")
    ap.add_argument("--run-id", default=None, help="with --render: the run to show [default: the last one]")


def render_recorded(args, load, fmt, plot, default_path) -> None:
    """``--render``: print the tables of a recorded run and (unless ``--no-plot``) draw its plot."""
    rows = load(args.render, args.run_id)
    print(fmt(rows))
    if not args.no_plot:
        path = plot(rows, args.plot or default_path(rows[0]["card"]))
        if path:
            print(f"plot written to {path}")


def world_caveats(world) -> list[str]:
    """The notes every bench's report ends with about the world its times come from: the CPU world's, a shared-GPU
    world's (not performance) and world size 1's (the no-communication reference)."""
    notes = []
    if world.interpreted:
        notes.append("CPU world (--smoke): wall-clock times of interpreted kernels, not a benchmark")
    if getattr(world, "shared_gpu", False):
        notes.append(f"SHARED-GPU WORLD: {world.world_size} ranks, {getattr(world, 'ranks_per_device', '?')} per GPU: "
                     "these times are not performance (every row is marked shared_gpu)")
    if world.world_size == 1:
        notes.append("world size 1: nothing is communicated; these are the no-communication reference times")
    return notes


def report_run(rows, notes, world, args, path, run_id, card, fmt, plot, default_path) -> None:
    """Rank 0's end of a benchmark run: the tables with their notes (plus the CPU-world, shared-GPU and world-size-1
    caveats), where the rows went (``path``, None when not written) and, unless ``--no-plot`` (or a smoke run without
    ``--plot``), the plot."""
    notes = list(notes) + world_caveats(world)
    print(fmt(rows, notes))
    if path:
        print(f"rows appended to {path} (run {run_id})")
    if rows and not args.no_plot and (not args.smoke or args.plot):
        written = plot(rows, args.plot or default_path(card))
        if written:
            print(f"plot written to {written}")
