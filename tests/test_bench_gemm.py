"""The GEMM benchmark: cases, checks, tables, plot and rows without GPUs, and its --smoke path end to end on a CPU
world (our ops against the gloo + torch.matmul sequence)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_dist.ops
from triton_dist import cli
from triton_dist.bench import gemm as G
from triton_dist.bench import report as R
from triton_dist.bench.harness import Recorder, Row
from test_bench_collectives import run_fake_shared  # tests/ is on sys.path, as for _util

ROOT = Path(__file__).resolve().parents[1]


def _row(op, fam, m, n, k, provider, us, world=4, run_id="run1"):
    return dict(op=op, shape=R.gemm_shape(fam, m, n, k), dtype="bfloat16", world_size=world, provider=provider,
                median_us=us, p20_us=us * 0.99, p80_us=us * 1.01, gbps=None, card="NVIDIA H100 80GB HBM3",
                torch="2.11.0", triton="3.6.0", commit="abc1234", date="2026-11-28", run_id=run_id,
                tflops=round(2 * m * n * k / (us * 1e-6) / 1e12, 2))


def _fake_rows():
    # DESIGN.md's goal shape: NCCL then cuBLAS 1.640 ms, GEMM alone 1.295 ms, torch fused 1.987 ms
    goal = [("nccl+cublas", 1640.0), ("gemm_alone", 1295.0), ("torch_symm_mem", 1987.0),
            ("triton_dist:sm", 1400.0), ("triton_dist:copy_engine", 1500.0)]
    rows = [_row("ag_gemm", "goal", 8192, 7168, 8192, p, us) for p, us in goal]
    for m, (fused, seq, nccl) in {1: (20.0, 30.0, 60.0), 64: (25.0, 31.0, 62.0)}.items():
        rows += [_row("gemm_ar", "llama3-8b", m, 4096, 3584, "triton_dist:fused", fused),
                 _row("gemm_ar", "llama3-8b", m, 4096, 3584, "triton_dist:sequential", seq),
                 _row("gemm_ar", "llama3-8b", m, 4096, 3584, "nccl+cublas", nccl)]
    rows.append(_row("gemm_ar", "llama3-8b", 64, 4096, 3584, "gemm_alone", 20.0))  # none at M=1: a "-" cell
    return rows


# ---------------------------------------------------------------- cases

def test_cases_follow_the_tensor_parallel_mlp_split():
    cases, notes = G.build_cases(["ag_gemm", "gemm_rs", "gemm_ar"], ["llama3-70b", "goal"], 4, [1024, 8192],
                                 [1, 256])
    assert notes == []
    got = {(c.op, c.family, c.m): (c.n, c.k) for c in cases}
    assert got[("ag_gemm", "llama3-70b", 1024)] == (28672 // 4, 8192)  # column parallel: N = I / w, K = H
    assert got[("gemm_rs", "llama3-70b", 8192)] == (8192, 28672 // 4)  # row parallel: N = H, K = I / w
    assert got[("gemm_ar", "llama3-70b", 1)] == (8192, 28672 // 4)
    assert got[("ag_gemm", "goal", 8192)] == (7168, 8192) and got[("ag_gemm", "goal", 4096)] == (2048, 8192)
    assert got[("gemm_rs", "goal", 8192)] == (8192, 7168)
    assert not any(c.op == "gemm_ar" and c.family == "goal" for c in cases)
    assert [c.m for c in cases if c.op == "gemm_ar"] == [1, 256]
    assert len(cases) == 2 + 2 + 2 + 1 + 2  # ag: 2 M + 2 goal; rs: 2 M + 1 goal; ar: 2 decode M


def test_case_shapes_and_flops():
    ag = G.Case("ag_gemm", "llama3-8b", 4096, 3584, 4096)
    assert ag.input_shapes(4) == ((1024, 4096), (4096, 3584)) and ag.out_shape(4) == (4096, 3584)
    assert ag.k_total(4) == 4096 and ag.flops == 2 * 4096 * 3584 * 4096
    rs = G.Case("gemm_rs", "llama3-8b", 4096, 4096, 3584)
    assert rs.input_shapes(4) == ((4096, 3584), (3584, 4096)) and rs.out_shape(4) == (1024, 4096)
    assert rs.k_total(4) == 4 * 3584
    ar = G.Case("gemm_ar", "llama3-8b", 16, 4096, 3584)
    assert ar.out_shape(4) == (16, 4096)
    assert R.parse_gemm_shape(ag.shape) == ("llama3-8b", 4096, 3584, 4096)
    with pytest.raises(ValueError):
        R.parse_gemm_shape("nbytes=4096")


def test_cases_the_world_size_rules_out_are_noted():
    cases, notes = G.build_cases(["ag_gemm", "gemm_ar"], ["llama3-8b", "qwen2-72b"], 3, [1024, 1023], [1])
    assert {c.family for c in cases} == {"qwen2-72b"}  # 14336 is not divisible by 3, 29568 is
    assert [c.m for c in cases if c.op == "ag_gemm"] == [1023]  # 1024 rows do not split over 3 ranks
    assert any("llama3-8b" in n and "intermediate size 14336" in n for n in notes)
    assert any("M=1024" in n for n in notes)
    smoke, _ = G.build_cases(["ag_gemm"], ["llama3-70b"], 2, [32], [1], smoke=True)
    assert [(c.family, c.m, c.n, c.k) for c in smoke] == [("smoke", 32, G.SMOKE_I_PER_RANK, G.SMOKE_H)]


def test_rotation_covers_twice_l2_for_inputs_that_fit():
    l2 = 50 << 20
    assert G.rotation(29 << 20, l2) == 4  # LLaMA-3-8B decode weights: 4 sets > 100 MiB
    assert G.rotation(200 << 20, l2) == 1
    assert G.rotation(1 << 10, l2) == 8  # capped
    assert G.rotation(1 << 20, 0) == 1  # CPU world: no cache to defeat


def test_heap_size():
    cases, _ = G.build_cases(list(R.GEMM_OPS), list(G.FAMILIES), 4, list(G.DEFAULT_M), list(G.DEFAULT_DECODE_M))
    heap = G.heap_bytes_for(cases, 4, 2)
    assert heap >= 4 << 30 and heap >= 4 * 8192 * 8192 * 4


# ---------------------------------------------------------------- checks

def test_tolerance_accepts_low_precision_gemms_and_rejects_a_wrong_tile():
    g = torch.Generator().manual_seed(0)
    world, m, k, n = 4, 64, 256, 48
    a = [(torch.rand(m, k, generator=g) * 2 - 1).half() for _ in range(world)]
    b = [((torch.rand(k, n, generator=g) * 2 - 1) / k ** 0.5).half() for _ in range(world)]
    ref = sum(x.double() @ y.double() for x, y in zip(a, b)).float()
    rtol = G.gemm_tolerance(torch.float16, world, k * world)
    # NCCL-like: every partial rounded to fp16, summed in fp16 hop by hop
    chained = (a[0].float() @ b[0].float()).half()
    for x, y in zip(a[1:], b[1:]):
        chained = (chained.float() + (x.float() @ y.float()).half().float()).half()
    assert G.compare_gemm(chained, ref, rtol=rtol) is None
    assert G.compare_gemm(ref.half(), ref, rtol=rtol) is None
    missing = sum(x.float() @ y.float() for x, y in zip(a[:-1], b[:-1])).half()  # one rank's partial lost
    assert G.compare_gemm(missing, ref, rtol=rtol) is not None
    tile = ref.half().clone()
    tile[16:32, 16:32] = 0  # a tile never written
    msg = G.compare_gemm(tile, ref, rtol=rtol)
    assert msg is not None and "elements off" in msg and "worst at" in msg
    nan = ref.half().clone()
    nan[3, 5] = float("nan")
    assert "(3, 5)" in G.compare_gemm(nan, ref, rtol=rtol)
    assert "shape" in G.compare_gemm(ref[:8], ref, rtol=rtol)


def test_recorder_tflops(tmp_path):
    rec = Recorder(str(tmp_path), 4, 0)
    row = rec.add("ag_gemm", R.gemm_shape("goal", 8192, 7168, 8192), "bfloat16", "gemm_alone", [1330.0] * 5,
                  flops=2 * 8192 * 7168 * 8192)
    assert row.gbps is None and row.tflops == pytest.approx(723.4, abs=0.1)  # DESIGN.md: cuBLAS 1.33 ms, 726
    rec.write()
    (path,) = tmp_path.glob("*.jsonl")
    assert json.loads(path.read_text())["tflops"] == row.tflops


# ---------------------------------------------------------------- options

def test_command_line():
    args = G.build_parser().parse_args(["--ops", "gemm_rs,ag_gemm", "--shapes", "goal", "--m", "4096,1024",
                                        "--decode-m", "1", "--samples", "5"])
    assert args.ops == ["gemm_rs", "ag_gemm"] and args.shapes == ["goal"] and args.m == [4096, 1024]
    assert args.decode_m == [1] and args.samples == 5
    defaults = G.build_parser().parse_args([])
    assert defaults.ops == list(R.GEMM_OPS) and defaults.shapes == list(G.FAMILIES) and defaults.m is None
    for bad in (["--ops", "all_reduce"], ["--shapes", "gpt2"], ["--m", "0"], ["--m", "x"]):
        with pytest.raises(SystemExit):
            G.build_parser().parse_args(bad)
    assert "gemm" in cli.BENCHES
    opts, extra = cli.build_parser().parse_known_args(["bench", "-n", "4", "gemm", "--ops", "ag_gemm"])
    assert opts.name == "gemm" and extra == ["--ops", "ag_gemm"]


# ---------------------------------------------------------------- tables, plot, recorded rows

def test_ratios_against_baselines_and_the_gemm_alone():
    s = R.summarize_gemm(_fake_rows())
    assert list(s) == [("ag_gemm", "goal"), ("gemm_ar", "llama3-8b")]
    d = s[("ag_gemm", "goal")]
    assert d["providers"] == ["triton_dist:sm", "triton_dist:copy_engine", "nccl+cublas", "torch_symm_mem",
                              "gemm_alone"]
    best, rt, alone = R.gemm_ratios(d, 8192)
    assert best == "triton_dist:sm"
    assert rt == pytest.approx({"nccl+cublas": 1640 / 1400, "torch_symm_mem": 1987 / 1400})
    assert alone == pytest.approx(1400 / 1295)
    assert R.gemm_ratios(s[("gemm_ar", "llama3-8b")], 1)[2] is None


def test_format_gemm_tables():
    ag, ar, notes = R.format_gemm_tables(_fake_rows(), notes=["x was skipped"]).split("\n\n")
    lines = ag.splitlines()
    assert lines[0].startswith("ag_gemm goal: N=7168 K=8192")
    for name in ("triton_dist:sm", "nccl+cublas", "torch_symm_mem", "gemm_alone", "best"):
        assert name in lines[1]
    assert len({len(line) for line in lines[1:]}) == 1, "header, rule and rows line up"
    cells = [c.split() for c in lines[-1].split("|")]
    assert cells[0] == ["8192"] and cells[1] == ["1400", f"{2 * 8192 * 7168 * 8192 / 1400e-6 / 1e12:.1f}"]
    assert cells[-4:] == [["sm"], [f"{1640 / 1400:.2f}"], [f"{1987 / 1400:.2f}"], [f"{1400 / 1295:.2f}"]]
    ar_m1 = next(line for line in ar.splitlines() if line.startswith("1 "))
    assert ar_m1.split("|")[-1].strip() == "-"  # no GEMM-alone row at M=1
    assert ar_m1.split("|")[-3].strip() == "fused"
    assert notes == "notes:\n  - x was skipped"


def test_plot_gemm_rows(tmp_path, capsys):
    path = tmp_path / "perf" / "gemm_h100.png"
    got = R.plot_gemm_rows(_fake_rows(), str(path))
    if importlib.util.find_spec("matplotlib") is not None:
        assert got == str(path) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert got is None and not path.exists()
        assert "matplotlib is not importable" in capsys.readouterr().out
    assert R.default_gemm_plot_path("NVIDIA H100 80GB HBM3") == "docs/perf/gemm_h100.png"


def test_gemm_and_collective_rows_share_a_file(tmp_path, capsys):
    path = tmp_path / "h100.jsonl"
    coll = dict(_row("all_reduce", "x", 1, 1, 1, "nccl", 20.0, run_id="coll"), shape="nbytes=4096", tflops=None)
    old = [_row("ag_gemm", "goal", 8192, 7168, 8192, "nccl+cublas", 1700.0, run_id="old")]
    path.write_text("".join(json.dumps(r) + "\n" for r in old + _fake_rows() + [coll]))
    assert len(R.load_gemm_rows(str(path))) == len(_fake_rows())
    assert [r["median_us"] for r in R.load_gemm_rows(str(path), "old")] == [1700.0]
    assert [r["op"] for r in R.load_rows(str(path))] == ["all_reduce"]
    with pytest.raises(ValueError):
        R.load_gemm_rows(str(path), "coll")
    G.main(["--render", str(path), "--no-plot"])
    out = capsys.readouterr().out
    assert out.startswith("ag_gemm goal") and "gemm_ar llama3-8b" in out


# ---------------------------------------------------------------- end to end on a CPU world

def _bench(args, tmp_path, script=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    target = ["run", "-n", "2", "--mode", "cpu", script] if script else ["bench", "-n", "2", "--mode", "cpu", "gemm",
                                                                          "--"]
    out = subprocess.run([sys.executable, "-m", "triton_dist", *target, *args, "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()] \
        if (tmp_path / "cpu.jsonl").exists() else []
    return out, rows


def _providers(rows):
    got = {}
    for r in rows:
        got.setdefault((r["op"], r["shape"]), set()).add(r["provider"])
    return got


def test_smoke_runs_every_cpu_provider(tmp_path):
    """Our methods (when triton_dist.ops has the op) and the gloo + torch.matmul sequence and the GEMM alone, for
    every op and smoke shape, each checked against the fp32 reference before it is timed."""
    out, rows = _bench([], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected_cases = {(c.op, c.shape) for c in G.build_cases(R.GEMM_OPS, (), 2, [32], G.SMOKE_DECODE_M,
                                                               smoke=True)[0]}
    got = _providers(rows)
    assert set(got) == expected_cases
    for (op, shape), providers in got.items():
        ours = {f"triton_dist:{m}" for m in G.OUR_METHODS[op]} if hasattr(triton_dist.ops, op) else set()
        assert providers == ours | {"gloo+torch", "gemm_alone"}, (op, shape)
        if not ours:
            assert f"triton_dist.ops has no {op} yet" in out.stderr
    assert all(r["world_size"] == 2 and r["dtype"] == "float16" and r["tflops"] is not None for r in rows)
    assert "ag_gemm smoke" in out.stdout and "gemm_rs smoke" in out.stdout and "gemm_ar smoke" in out.stdout


def test_smoke_with_stand_in_ops_times_ours_and_reports_failures(tmp_path):
    script = "tests/scripts/gemm_bench_standin.py"
    out, rows = _bench(["correct", "--ops", "ag_gemm,gemm_rs"], tmp_path / "ok", script=script)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert {p for ps in _providers(rows).values() for p in ps} >= {
        "triton_dist:sm", "triton_dist:copy_engine", "triton_dist:fused", "triton_dist:sequential_reduce"}
    out, rows = _bench(["wrong", "--ops", "ag_gemm"], tmp_path / "wrong", script=script)
    assert out.returncode == 1
    assert "triton_dist:sm: not timed (rank 0: MISMATCH" in out.stderr  # the ranks see different values
    assert {r["provider"] for r in rows} == {"triton_dist:copy_engine", "triton_dist:sequential", "gloo+torch",
                                             "gemm_alone"}
    out, rows = _bench(["raises", "--ops", "gemm_rs"], tmp_path / "raises", script=script)
    assert out.returncode == 1
    assert "triton_dist:fused: not timed (all ranks: ERROR RuntimeError: stand-in failure)" in out.stderr
    assert "triton_dist:sequential_reduce" in {r["provider"] for r in rows}


# ---------------------------------------------------------------- shared-GPU worlds

def _shared_rows():
    """A shared-GPU run: ours and the GEMM alone (no NCCL or symmetric-memory baseline runs there), marked."""
    return [dict(_row("gemm_ar", "llama3-8b", m, 4096, 3584, p, us), shared_gpu=True)
            for m in (1, 64) for p, us in (("triton_dist:fused", 40.0), ("triton_dist:sequential", 50.0),
                                           ("gemm_alone", 20.0))]


def test_gemm_row_round_trips_with_shared_gpu_and_old_rows_still_load(tmp_path):
    rec = Recorder(str(tmp_path), 4, 0, shared_gpu=True)
    row = rec.add("gemm_ar", R.gemm_shape("llama3-8b", 16, 4096, 3584), "bfloat16", "gemm_alone", [20.0] * 3,
                  flops=2 * 16 * 4096 * 3584)
    rec.write()
    (path,) = tmp_path.glob("*.jsonl")
    d = json.loads(path.read_text())
    assert d["shared_gpu"] is True and Row.from_dict(d) == row
    old = {k: v for k, v in _row("ag_gemm", "goal", 8192, 7168, 8192, "nccl+cublas", 1700.0, run_id="old").items()
           if k != "tflops"}  # a row from before tflops and shared_gpu
    assert Row.from_dict(old).shared_gpu is False and Row.from_dict(old).tflops is None
    path.write_text(json.dumps(old) + "\n" + json.dumps(d) + "\n")
    rows = R.load_gemm_rows(str(path), "old")
    text = R.format_gemm_tables(rows)
    assert text.startswith("ag_gemm goal: N=7168 K=8192") and R.SHARED_GPU_MARK not in text
    assert text.splitlines()[-1].split("|")[1].split() == ["1700", "-"]  # no tflops: a "-" cell


def test_gemm_tables_of_shared_rows_carry_the_mark_and_lack_only_the_baseline_ratios():
    (table,) = R.format_gemm_tables(_shared_rows()).split("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("gemm_ar llama3-8b") and lines[0].endswith(R.SHARED_GPU_MARK)
    assert "nccl" not in lines[1] and "/ours" not in lines[2] and "/gemm" in lines[2]
    assert [c.strip() for c in lines[-1].split("|")[-2:]] == ["fused", f"{40 / 20:.2f}"]
    assert len({len(line) for line in lines[1:]}) == 1
    d = R.summarize_gemm(_shared_rows())[("gemm_ar", "llama3-8b")]
    assert d["shared_gpu"] is True and R.gemm_ratios(d, 64) == ("triton_dist:fused", {}, 2.0)
    assert R.SHARED_GPU_MARK not in R.format_gemm_tables(_fake_rows())
    assert R.plot_title(_shared_rows(), "gemm")[0] == f"gemm  {R.SHARED_GPU_MARK}"


def test_gemm_provider_plan_keeps_only_the_gemm_alone_in_a_shared_world():
    plan, notes = G.provider_plan(R.GEMM_OPS, gpu=True, shared_gpu=True, host_backend="gloo")
    assert plan == {op: ["gemm_alone"] for op in R.GEMM_OPS}
    assert notes == [f"nccl+cublas baselines not run: {R.SHARED_GPU_NO_NCCL}",
                     f"torch_symm_mem baselines not run: {R.SHARED_GPU_NO_SYMM_MEM}"]
    gpus, notes = G.provider_plan(R.GEMM_OPS, gpu=True, host_backend="cpu:gloo,cuda:nccl")
    assert gpus == {"ag_gemm": ["nccl+cublas", "torch_symm_mem", "gemm_alone"],
                    "gemm_rs": ["nccl+cublas", "torch_symm_mem", "gemm_alone"],
                    "gemm_ar": ["nccl+cublas", "torch_symm_mem:one_shot", "gemm_alone"]} and notes == []
    cpu, notes = G.provider_plan(["gemm_rs"], gpu=False, host_backend="gloo")
    assert cpu == {"gemm_rs": ["gloo+torch", "gemm_alone"]} and len(notes) == 1 and "need CUDA" in notes[0]


def test_smoke_in_a_faked_shared_world_runs_ours_and_the_gemm_alone_only(tmp_path):
    out = run_fake_shared("triton_dist.bench.gemm", ["--smoke", "--ops", "gemm_ar", "--out", str(tmp_path / "res")],
                          tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("=" * 100 + "\nSHARED-GPU WORLD: 2 ranks on one GPU")
    rows = [json.loads(line) for line in (tmp_path / "res" / "cpu.jsonl").read_text().splitlines()]
    ours = {f"triton_dist:{m}" for m in G.OUR_METHODS["gemm_ar"]} if hasattr(triton_dist.ops, "gemm_ar") else set()
    assert {r["provider"] for r in rows} == ours | {"gemm_alone"}
    assert rows and all(r["shared_gpu"] is True for r in rows)
    tables = [b for b in out.stdout.split("\n\n") if b.startswith("gemm_ar smoke")]
    assert len(tables) == 1 and tables[0].splitlines()[0].endswith(R.SHARED_GPU_MARK)
    assert "nccl+cublas baselines not run" in out.stdout and "torch_symm_mem baselines not run" in out.stdout
