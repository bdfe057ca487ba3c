"""The collectives benchmark's GPU-free parts: bus bandwidth, size sweep, tables, plot, progress bar, checks."""
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from triton_dist import cli
from triton_dist.bench import collectives as C
from triton_dist.bench import report as R
from triton_dist.bench.harness import Recorder, Row

ROOT = Path(__file__).resolve().parents[1]

KiB, MiB = 1 << 10, 1 << 20


def _row(op, nbytes, provider, us, world=4, run_id="run1", dtype="bfloat16"):
    gbps = round(C.busbw_gbps(op, nbytes, world, us), 2)
    return dict(op=op, shape=f"nbytes={nbytes}", dtype=dtype, world_size=world, provider=provider, median_us=us,
                p20_us=us * 0.99, p80_us=us * 1.01, gbps=gbps, card="NVIDIA H100 80GB HBM3", torch="2.11.0",
                triton="3.6.0", commit="abc1234", date="2026-11-28", run_id=run_id)


def _fake_rows():
    rows = []
    for s, (one, two, nccl, so, st) in {4 * KiB: (8.0, 12.0, 20.0, 10.0, 16.0),
                                        256 * MiB: (2000.0, 1100.0, 1280.0, 2400.0, 1300.0)}.items():
        rows += [_row("all_reduce", s, "triton_dist:one_shot", one), _row("all_reduce", s, "triton_dist:two_shot", two),
                 _row("all_reduce", s, "nccl", nccl), _row("all_reduce", s, "torch_symm_mem:one_shot", so),
                 _row("all_reduce", s, "torch_symm_mem:two_shot", st)]
    rows += [_row("all_gather", 64 * MiB, "nccl", 756.0), _row("all_gather", 64 * MiB, "triton_dist:pull", 700.0),
             _row("all_gather", 4 * KiB, "nccl", 15.0)]  # no triton_dist row at 4 KiB: a "-" cell
    return rows


# ---------------------------------------------------------------- bus bandwidth (nccl-tests conventions)

@pytest.mark.parametrize("world", [2, 4, 8])
def test_bus_factors(world):
    n = world
    assert C.bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert C.bus_factor(op, n) == pytest.approx((n - 1) / n)
    assert C.alg_bytes("all_reduce", 1000, n) == 1000  # per-rank input
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert C.alg_bytes(op, 1000, n) == n * 1000  # all_gather's output / reduce_scatter's input
    with pytest.raises(ValueError):
        C.bus_factor("broadcast", n)


def test_busbw_matches_design_md_nccl_numbers():
    # DESIGN.md, 4x H100: NCCL all_reduce 256 MiB bf16 in 1.28 ms = 315 GB/s; all_gather 64 MiB/rank 0.756 ms = 266 GB/s
    assert C.busbw_gbps("all_reduce", 256 * MiB, 4, 1280.0) == pytest.approx(314.6, abs=0.1)
    assert C.busbw_gbps("all_gather", 64 * MiB, 4, 756.0) == pytest.approx(266.3, abs=0.1)
    # reduce_scatter of a 4*S input moves what all_gather of S does
    assert C.busbw_gbps("reduce_scatter", MiB, 4, 10.0) == C.busbw_gbps("all_gather", MiB, 4, 10.0)


def test_recorder_gbps_is_busbw(tmp_path):
    rec = Recorder(str(tmp_path), 4, 0)
    row = rec.add("all_reduce", "nbytes=268435456", "bfloat16", "nccl", [1280.0] * 5,
                  nbytes=C.bus_bytes("all_reduce", 256 * MiB, 4))
    assert row.gbps == 314.57


# ---------------------------------------------------------------- sizes and options

def test_size_sweep_default_is_4k_to_256m_in_x4_steps():
    assert C.size_sweep(4096, 256 * MiB) == [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB,
                                             256 * MiB]
    assert C.size_sweep(4096, 4096) == [4096]
    assert C.size_sweep(4096, 100_000) == [4096, 16384, 65536]  # max off the grid: the last point below it
    assert C.size_sweep(6 * KiB, 48 * KiB, step=2) == [6 * KiB, 12 * KiB, 24 * KiB, 48 * KiB]
    for lo, hi, step in ((0, 10, 4), (8192, 4096, 4), (4096, 8192, 1)):
        with pytest.raises(ValueError):
            C.size_sweep(lo, hi, step)


def test_parse_bytes_and_ops():
    assert [C.parse_bytes(t) for t in ("4096", "4K", "4k", "64KiB", "256M", "1G", "2 MB")] == [
        4096, 4096, 4096, 64 * KiB, 256 * MiB, 1 << 30, 2 * MiB]
    for bad in ("", "4X", "-1", "1.5M"):
        with pytest.raises(ValueError):
            C.parse_bytes(bad)
    assert C.parse_ops("all_gather, all_reduce,all_gather") == ["all_gather", "all_reduce"]
    with pytest.raises(ValueError):
        C.parse_ops("all_reduce,broadcast")


def test_command_line():
    args = C.build_parser().parse_args(["--min-bytes", "16K", "--max-bytes", "4M", "--ops", "all_reduce",
                                        "--graph-below", "0", "--dtype", "fp16"])
    assert C.size_sweep(args.min_bytes, args.max_bytes, args.step) == [16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB]
    assert args.ops == ["all_reduce"] and args.graph_below == 0 and args.dtype == "fp16" and args.samples >= 20
    defaults = C.build_parser().parse_args([])
    assert defaults.ops == list(C.OPS) and defaults.graph_below == MiB
    assert "collectives" in cli.BENCHES
    opts, extra = cli.build_parser().parse_known_args(["bench", "-n", "4", "collectives", "--max-bytes", "1M"])
    assert opts.name == "collectives" and extra == ["--max-bytes", "1M"]


def test_heap_size_covers_the_largest_staging():
    assert C.heap_bytes_for(4, 4 * KiB) == 2 << 30
    assert C.heap_bytes_for(8, 256 * MiB) >= 2 * 8 * 256 * MiB


def test_fmt_bytes():
    assert [C.fmt_bytes(n) for n in (4096, 64 * KiB, MiB, 256 * MiB, 1 << 30, 3 * MiB, 1000)] == [
        "4 KiB", "64 KiB", "1 MiB", "256 MiB", "1 GiB", "3 MiB", "1000 B"]


# ---------------------------------------------------------------- correctness checks

def test_compare_exact_and_reduction_tolerance():
    g = torch.Generator().manual_seed(0)
    world = 4
    xs = [torch.rand(4096, generator=g) * 2 - 1 for _ in range(world)]
    exact32 = torch.stack(xs).double().sum(0).float()
    ours = sum(x.float() for x in xs).to(torch.bfloat16)  # fp32 accumulation, one rounding
    assert C.compare(ours, exact32, exact=False, dtype=torch.bfloat16, world=world) is None
    chained = xs[0].to(torch.bfloat16)
    for x in xs[1:]:  # a bf16 ring: rounds after every hop
        chained = (chained.float() + x.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert C.compare(chained, exact32, exact=False, dtype=torch.bfloat16, world=world,
                     fp32_accumulation=False) is None
    wrong = ours.clone()
    wrong[100] += 0.25
    msg = C.compare(wrong, exact32, exact=False, dtype=torch.bfloat16, world=world)
    assert msg is not None and "flat index 100" in msg
    nan = ours.clone()
    nan[7] = float("nan")
    assert C.compare(nan, exact32, exact=False, dtype=torch.bfloat16, world=world) is not None
    a = torch.arange(10, dtype=torch.int32)
    assert C.compare(a, a.clone(), exact=True, dtype=torch.int32, world=world) is None
    b = a.clone()
    b[3] = -1
    assert "1 of 10 elements differ" in C.compare(b, a, exact=True, dtype=torch.int32, world=world)
    assert "shape" in C.compare(a[:5], a, exact=True, dtype=torch.int32, world=world)


def test_group_errors():
    assert C.group_errors([None, None]) == []
    assert C.group_errors(["x", "x", "x"]) == ["all ranks: x"]
    assert C.group_errors([None, "x", "y", "x"]) == ["ranks 1,3: x", "rank 2: y"]


# ---------------------------------------------------------------- tables

def test_summarize_orders_ops_sizes_and_providers():
    rows = list(reversed(_fake_rows()))
    s = R.summarize(rows)
    assert list(s) == ["all_reduce", "all_gather"]
    assert s["all_reduce"]["sizes"] == [4 * KiB, 256 * MiB]
    assert [p.split(":")[0] for p in s["all_reduce"]["providers"]][:2] == ["triton_dist", "triton_dist"]
    assert s["all_gather"]["providers"][0] == "triton_dist:pull"


def test_ratios_use_each_family_best_over_our_best():
    s = R.summarize(_fake_rows())["all_reduce"]
    best, r = R.ratios(s, 4 * KiB)
    assert best == "triton_dist:one_shot"
    assert r == pytest.approx({"nccl": 20.0 / 8.0, "torch_symm_mem": 10.0 / 8.0})
    best, r = R.ratios(s, 256 * MiB)
    assert best == "triton_dist:two_shot"
    assert r == pytest.approx({"nccl": 1280.0 / 1100.0, "torch_symm_mem": 1300.0 / 1100.0})


def test_format_tables():
    text = R.format_tables(_fake_rows(), notes=["something was skipped"])
    ar, ag, notes = text.split("\n\n")
    lines = ar.splitlines()
    assert lines[0].startswith("all_reduce  (4 ranks, bfloat16")
    for name in ("triton_dist:one_shot", "triton_dist:two_shot", "nccl", "torch_symm_mem:one_shot",
                 "torch_symm_mem:two_shot", "best"):
        assert name in lines[1]
    assert "us" in lines[2] and "GB/s" in lines[2] and "/ours" in lines[2]
    widths = {len(line) for line in lines[1:]}
    assert len(widths) == 1, "header, rule and rows line up"
    row4k = next(line for line in lines if line.startswith("4 KiB"))
    cells = [c.split() for c in row4k.split("|")]
    assert cells[1] == ["8.00", f"{C.busbw_gbps('all_reduce', 4 * KiB, 4, 8.0):.2f}"]
    assert cells[-3:] == [["one_shot"], ["2.50"], ["1.25"]]
    row256 = next(line for line in lines if line.startswith("256 MiB"))
    assert [c.strip() for c in row256.split("|")[-3:]] == ["two_shot", f"{1280 / 1100:.2f}", f"{1300 / 1100:.2f}"]
    assert row256.split("|")[2].split() == ["1100", f"{round(1.5 * 256 * MiB / 1100e-6 / 1e9, 2):.1f}"]
    ag4k = next(line for line in ag.splitlines() if line.startswith("4 KiB"))
    assert ag4k.split("|")[1].split() == ["-", "-"] and ag4k.split("|")[-2].strip() == "-"
    assert notes == "notes:\n  - something was skipped"
    assert R.format_tables([]) == ""


# ---------------------------------------------------------------- plot

def test_plot_rows(tmp_path, capsys):
    path = tmp_path / "perf" / "collectives_h100.png"
    got = R.plot_rows(_fake_rows(), str(path))
    if importlib.util.find_spec("matplotlib") is not None:
        assert got == str(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
    else:
        assert got is None and not path.exists()
        assert "matplotlib is not importable" in capsys.readouterr().out


def test_plot_without_matplotlib_prints_a_note(tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "p.png"
    assert R.plot_rows(_fake_rows(), str(path)) is None
    assert not path.exists()
    assert "matplotlib is not importable" in capsys.readouterr().out


def test_default_plot_path():
    assert R.default_plot_path("NVIDIA H100 80GB HBM3") == "docs/perf/collectives_h100.png"


# ---------------------------------------------------------------- recorded rows

def test_load_rows_picks_the_last_collectives_run(tmp_path):
    path = tmp_path / "h100.jsonl"
    old = [_row("all_reduce", 4 * KiB, "nccl", 30.0, run_id="old")]
    new = [_row("all_reduce", 4 * KiB, "nccl", 20.0, run_id="new")]
    prim = dict(old[0], op="peer_put", run_id="prim")
    path.write_text("".join(json.dumps(r) + "\n" for r in old + new + [prim]))
    assert [r["median_us"] for r in R.load_rows(str(path))] == [20.0]
    assert [r["median_us"] for r in R.load_rows(str(path), "old")] == [30.0]
    with pytest.raises(ValueError):
        R.load_rows(str(path), "prim")


def test_render_prints_tables_without_a_world(tmp_path, capsys):
    path = tmp_path / "h100.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _fake_rows()))
    C.main(["--render", str(path), "--no-plot"])
    out = capsys.readouterr().out
    assert out.startswith("all_reduce  (4 ranks") and "all_gather" in out


# ---------------------------------------------------------------- progress bar

def test_progress_line():
    assert R.progress_line(12, 54, "all_reduce 64 KiB", width=10) == "[##........] 12/54 all_reduce 64 KiB"
    assert R.progress_line(0, 3, width=4) == "[....] 0/3"
    assert R.progress_line(3, 3, width=4) == "[####] 3/3"


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_streams():
    pipe = io.StringIO()
    bar = R.Progress(2, stream=pipe, width=4)
    bar.update(1, "a")
    bar.note("hello")
    bar.update(2, "b")
    bar.finish()
    assert pipe.getvalue() == "[##..] 1/2 a\nnote: hello\n[####] 2/2 b\n"
    tty = _TTY()
    bar = R.Progress(2, stream=tty, width=4)
    bar.update(1, "long label")
    bar.update(2, "x")
    bar.finish()
    assert tty.getvalue() == "\r[##..] 1/2 long label" + "\r" + "[####] 2/2 x".ljust(21) + "\n"
    quiet = io.StringIO()
    bar = R.Progress(2, enabled=False, stream=quiet)
    bar.update(1, "a")
    bar.note("n")
    bar.finish()
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- shared-GPU worlds and world size 1

def _shared_rows():
    """A shared-GPU run: our rows only (no baseline runs there), marked shared_gpu."""
    return [dict(_row("all_reduce", s, p, us), shared_gpu=True)
            for s in (4 * KiB, MiB) for p, us in (("triton_dist:one_shot", 8.0), ("triton_dist:two_shot", 12.0))]


def test_row_round_trips_with_shared_gpu_and_old_rows_still_load(tmp_path):
    rec = Recorder(str(tmp_path), 4, 0, shared_gpu=True)
    row = rec.add("all_reduce", "nbytes=4096", "bfloat16", "triton_dist:one_shot", [8.0] * 3,
                  nbytes=C.bus_bytes("all_reduce", 4 * KiB, 4))
    assert row.shared_gpu is True
    rec.write()
    (path,) = tmp_path.glob("*.jsonl")
    (line,) = path.read_text().splitlines()
    d = json.loads(line)
    assert d["shared_gpu"] is True
    assert Row.from_dict(d) == row
    assert Recorder(str(tmp_path), 4, 0).shared_gpu is False  # no world in this process: not shared
    old = _row("all_reduce", 4 * KiB, "nccl", 20.0, run_id="old")  # written before tflops and shared_gpu existed
    assert "shared_gpu" not in old and "tflops" not in old
    loaded = Row.from_dict(dict(old, some_future_key=1))
    assert loaded.shared_gpu is False and loaded.tflops is None and loaded.median_us == 20.0
    path.write_text("".join(json.dumps(r) + "\n" for r in [old, d]))
    assert [r["provider"] for r in R.load_rows(str(path), "old")] == ["nccl"]
    text = R.format_tables(R.load_rows(str(path), "old"))
    assert text.startswith("all_reduce  (4 ranks") and R.SHARED_GPU_MARK not in text


def test_tables_and_plot_title_of_shared_rows_carry_the_mark():
    text = R.format_tables(_shared_rows(), notes=["nccl not run"])
    table, notes = text.split("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("all_reduce  (4 ranks") and lines[0].endswith(R.SHARED_GPU_MARK)
    assert "/ours" not in lines[2] and "best" in lines[1]  # no baseline rows: no ratio columns, nothing missing
    assert [c.strip() for c in lines[-1].split("|")][-1] == "one_shot"
    assert len({len(line) for line in lines[1:]}) == 1
    assert R.SHARED_GPU_MARK not in R.format_tables(_fake_rows())
    assert R.summarize(_shared_rows())["all_reduce"]["shared_gpu"] is True
    assert R.summarize(_fake_rows())["all_reduce"]["shared_gpu"] is False
    assert R.ratios(R.summarize(_shared_rows())["all_reduce"], 4 * KiB) == ("triton_dist:one_shot", {})
    title, style = R.plot_title(_shared_rows(), "H100: collectives")
    assert title == f"H100: collectives  {R.SHARED_GPU_MARK}" and style == {"color": "red"}
    assert R.plot_title(_fake_rows(), "H100: collectives") == ("H100: collectives", {})
    assert R.plot_title(_shared_rows(), title)[0] == title  # marked once


def test_primitives_table_of_shared_rows_carries_the_mark(tmp_path):
    rec = Recorder(str(tmp_path), 2, 0, shared_gpu=True)
    rec.add("signal_rtt", "iters=5000", "int32", "triton_dist:release_relaxed_fence", [2.0] * 3)
    lines = rec.table(notes=["a note"]).splitlines()
    assert lines[0] == f"2 ranks {R.SHARED_GPU_MARK}" and lines[-1] == "  - a note"
    assert lines[2].split()[2] == "triton_dist:release_relaxed_fence" and len(lines[1]) == len(lines[2])
    plain = Recorder(str(tmp_path), 2, 0, shared_gpu=False)
    plain.add("peer_put", "nbytes=4096", "int32", "copy_engine", [2.0] * 3, nbytes=4096)
    assert R.SHARED_GPU_MARK not in plain.table() and plain.table().startswith("op ")


def test_provider_plan_leaves_nccl_and_symmetric_memory_out_of_a_shared_world():
    plan, notes = C.provider_plan(C.OPS, gpu=True, shared_gpu=True, host_backend="gloo")
    assert list(plan) == list(C.OPS)
    for op, names in plan.items():
        assert names == [f"triton_dist:{m}" for m in C.OUR_METHODS[op]], op
    assert len(notes) == 2
    assert notes[0].startswith("nccl not run (all_reduce, all_gather, reduce_scatter, all_to_all)")
    assert "gloo on one GPU is no baseline" in notes[0]
    assert notes[1].startswith("torch_symm_mem not run (all_reduce torch_symm_mem:one_shot, torch_symm_mem:two_shot)")
    assert R.SHARED_GPU_NO_SYMM_MEM in notes[1]
    gpus, notes = C.provider_plan(["all_reduce", "all_gather"], gpu=True, host_backend="cpu:gloo,cuda:nccl")
    assert gpus["all_reduce"][-3:] == ["nccl", "torch_symm_mem:one_shot", "torch_symm_mem:two_shot"]
    assert gpus["all_gather"][-1] == "nccl" and notes == []
    cpu, notes = C.provider_plan(["all_reduce"], gpu=False)
    assert cpu["all_reduce"][-1] == "gloo" and not any("torch_symm_mem" in p for p in cpu["all_reduce"])
    assert len(notes) == 1 and "needs CUDA" in notes[0]


def test_shared_gpu_banner_and_caveats(capsys):
    text = R.shared_gpu_banner(4, 4, mps=False, num_sms=32)
    lines = text.splitlines()
    assert lines[0] == lines[-1] == "=" * 100
    assert lines[1] == ("SHARED-GPU WORLD: 4 ranks on one GPU (no MPS: the ranks time-slice the GPU; persistent grids "
                        "of 32 SMs per rank).")
    body = " ".join(lines[1:-1])
    for words in ("Timings here are not performance", "NCCL and torch symmetric-memory baselines are skipped",
                  '"shared_gpu": true', "`-n 1` is the no-communication reference"):
        assert words in body
    assert "8 ranks sharing GPUs, 4 per GPU (MPS on: the ranks run concurrently)" in R.shared_gpu_banner(8, 4, mps=True)
    stream = io.StringIO()
    world = SimpleNamespace(shared_gpu=True, rank=0, world_size=4, ranks_per_device=4, mps=False, num_sms=32)
    assert R.announce_shared_gpu(world, stream) == text and stream.getvalue() == text + "\n\n"
    other = io.StringIO()
    assert R.announce_shared_gpu(SimpleNamespace(**dict(vars(world), rank=1)), other) == text
    assert other.getvalue() == ""  # rank 0 prints it
    assert R.announce_shared_gpu(SimpleNamespace(**dict(vars(world), shared_gpu=False)), other) is None
    assert other.getvalue() == "" and capsys.readouterr().out == ""
    caveats = R.world_caveats(SimpleNamespace(interpreted=False, shared_gpu=True, world_size=4, ranks_per_device=4))
    assert caveats == ["SHARED-GPU WORLD: 4 ranks, 4 per GPU: these times are not performance (every row is marked "
                       "shared_gpu)"]
    single = R.world_caveats(SimpleNamespace(interpreted=False, shared_gpu=False, world_size=1))
    assert single == ["world size 1: nothing is communicated; these are the no-communication reference times"]


FAKE_SHARED = '''"""A CPU world that calls itself shared-GPU, to run a bench's shared-world path; argv[1]: the bench."""
import importlib
import sys

from triton_dist.runtime import world as W

_init = W.init


def init(*args, **kwargs):
    w = _init(*args, **kwargs)
    w.shared_gpu, w.ranks_per_device = True, w.world_size
    return w


W.init = init
importlib.import_module(sys.argv[1]).main(sys.argv[2:])
'''


def run_fake_shared(module, args, tmp_path, n=2, timeout=600):
    """``module``'s main on an n-rank CPU world whose World says ``shared_gpu`` (tests of both benches use it)."""
    script = tmp_path / "fake_shared.py"
    script.write_text(FAKE_SHARED)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "triton_dist", "run", "-n", str(n), "--mode", "cpu", str(script),
                           module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_in_a_faked_shared_world_runs_ours_only_under_the_banner(tmp_path):
    out = run_fake_shared("triton_dist.bench.collectives", ["--smoke", "--ops", "all_reduce,all_gather", "--min-bytes",
                                                            "4K", "--max-bytes", "4K", "--samples", "1"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("=" * 100 + "\nSHARED-GPU WORLD: 2 ranks on one GPU")
    assert out.stdout.count("SHARED-GPU WORLD: 2 ranks on one GPU") == 1  # rank 0, once
    tables = [b for b in out.stdout.split("\n\n") if b.startswith(("all_reduce  (", "all_gather  ("))]
    assert len(tables) == 2 and all(t.splitlines()[0].endswith(R.SHARED_GPU_MARK) for t in tables)
    providers = tables[0].splitlines()[1]
    assert "triton_dist:one_shot" in providers and "gloo" not in providers and "nccl" not in providers
    assert "torch_symm_mem" not in providers and "/ours" not in tables[0].splitlines()[2]
    assert "nccl not run (all_reduce, all_gather): " in out.stdout
    assert "torch_symm_mem not run (all_reduce torch_symm_mem:one_shot" in out.stdout
    assert "SHARED-GPU WORLD: 2 ranks, 2 per GPU: these times are not performance" in out.stdout


def test_primitives_plan_and_a_faked_shared_world(tmp_path):
    from triton_dist.bench import primitives as P
    assert P.plan_notes(2) == (True, [])
    rtt, notes = P.plan_notes(1)
    assert not rtt and notes[0].startswith("signal_rtt not run") and "own heap" in notes[1]
    assert P.plan_notes(3) == (True, ["signal_rtt: rank 2 has no partner and idles"])
    out = run_fake_shared("triton_dist.bench.primitives", ["--smoke", "--sizes", "4096", "--out", str(tmp_path / "r")],
                          tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    banner, table = out.stdout.split("\n\n", 1)
    assert banner.splitlines()[1].startswith("SHARED-GPU WORLD: 2 ranks on one GPU")
    assert table.startswith(f"2 ranks {R.SHARED_GPU_MARK}\nop ")
    rows = [json.loads(line) for line in (tmp_path / "r" / "cpu.jsonl").read_text().splitlines()]
    assert {r["op"] for r in rows} == {"signal_rtt", "peer_put", "peer_get"} and all(r["shared_gpu"] for r in rows)
