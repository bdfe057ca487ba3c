"""The compute-cores benchmark: model projections and their tensor-parallel shards, the group cases, the tolerance, and
its --smoke path end to end on a one-rank CPU world (the dense core through ag_gemm / gemm_rs and the decode core
against torch.matmul, the grouped core against torch._grouped_mm, each checked before it is timed), and the tables and
plot drawn from recorded rows (--render)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_dist.bench import cores as C

ROOT = Path(__file__).resolve().parents[1]


def test_projections_of_the_issue_models_and_their_shards():
    full = {p.name: (p.k, p.n) for p in C.projections("qwen3-8b", 1)}
    assert full == {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096),
                    "lm_head": (4096, 151936)}
    tp4 = {p.name: (p.k, p.n) for p in C.projections("qwen3-8b", 4)}
    assert tp4 == {"qkv": (4096, 1536), "o": (1024, 4096), "gate_up": (4096, 6144), "down": (3072, 4096),
                   "lm_head": (4096, 37984)}  # column-parallel: N / tp; row-parallel: K / tp
    assert {p.name: (p.k, p.n) for p in C.projections("qwen3-32b", 8)}["gate_up"] == (5120, 6400)
    assert C.projections("llama3-8b", 2)[3].shape(16) == "llama3-8b:down/tp2:M=16,N=4096,K=7168"
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        C.projections("qwen3-8b", 3)


def test_group_cases_are_the_issue_shapes():
    cases = {c.shape() for c in C.group_cases()}
    assert "prefill:E=8,rows=4096,N=1792,K=4096" in cases and "decode:E=128,rows=16,N=1536,K=2048" in cases
    assert C.smoke_group_cases()[0].shape() == "tiny:E=3,rows=var,N=48,K=64"  # an empty expert in the middle


def test_tolerance_grows_with_k_and_is_tight_for_fp32():
    assert C.decode_tolerance(torch.bfloat16, 16384) > C.decode_tolerance(torch.bfloat16, 64) > 0
    assert C.decode_tolerance(torch.float32, 4096) == 1e-4


def test_smoke_times_the_decode_core_and_the_baseline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", "1", "--mode", "cpu", "cores", "--",
                          "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    want = {("decode_gemm", p.shape(m)): {"triton_dist:decode_gemm", "cublas"} for p in C.smoke_projections()
            for m in C.SMOKE_M}
    want.update({("gemm_core", f"{c.op}:{c.shape}"): {"triton_dist:gemm_core", "cublas"}
                 for c in C.dense_cases(True, C.DENSE_M)})
    # torch._grouped_mm where this torch has it (its wrapper says why not otherwise: noted, not timed)
    grouped = {"triton_dist:grouped_gemm"} | ({"torch_grouped_mm"} if hasattr(torch, "_grouped_mm") else set())
    want.update({("grouped_gemm", c.shape()): grouped for c in C.smoke_group_cases()})
    got = {}
    for r in rows:
        got.setdefault((r["op"], r["shape"]), set()).add(r["provider"])
        assert r["world_size"] == 1 and r["dtype"] == "float16"
        assert r["gbps"] is not None and r["tflops"] is not None
    assert got == want, got
    assert "triton_dist:" not in "".join(line for line in out.stderr.splitlines() if "not timed" in line)
    assert "gemm_core: ours / cublas time" in out.stdout and "decode_gemm: ours / cublas time" in out.stdout


def test_dense_cases_are_bench_gemms_world_one_shapes():
    shapes = {f"{c.op}:{c.shape}" for c in C.dense_cases(False, C.DENSE_M)}
    assert "ag_gemm:goal:M=8192,N=7168,K=8192" in shapes and "gemm_rs:goal:M=8192,N=8192,K=7168" in shapes
    assert "ag_gemm:qwen2-72b:M=1024,N=29568,K=8192" in shapes and "gemm_rs:llama3-70b:M=2048,N=8192,K=28672" in shapes
    assert len(shapes) == 3 + 2 * 3 * len(C.DENSE_M)


def _row(op, shape, provider, us, run="r1", world_size=1):
    return {"op": op, "shape": shape, "provider": provider, "median_us": us, "run_id": run, "world_size": world_size,
            "card": "NVIDIA H200", "date": "2026-12-01", "shared_gpu": False}


def test_pairs_tables_and_render_from_recorded_rows(tmp_path, capsys):
    rows = [_row("decode_gemm", "s1", "triton_dist:decode_gemm", 12.0), _row("decode_gemm", "s1", "cublas", 10.0),
            _row("decode_gemm", "s1", "triton_dist:decode_gemm", 9.0, run="r2"),  # a later run replaces the first
            _row("grouped_gemm", "g", "triton_dist:grouped_gemm", 5.0),
            _row("grouped_gemm", "g", "torch_grouped_mm", 8.0),
            # bench gemm's world-1 rows: ours is the slower fused method, against gemm_alone
            _row("ag_gemm", "goal:M=8,N=8,K=8", "triton_dist:copy_engine", 101.0),
            _row("ag_gemm", "goal:M=8,N=8,K=8", "triton_dist:sm", 103.0),
            _row("ag_gemm", "goal:M=8,N=8,K=8", "triton_dist:sequential", 90.0),
            _row("ag_gemm", "goal:M=8,N=8,K=8", "gemm_alone", 100.0),
            _row("ag_gemm", "goal:M=8,N=8,K=8", "gemm_alone", 50.0, world_size=2),  # not the world-1 core
            _row("decode_gemm", "lonely", "cublas", 1.0)]  # no pair: left out
    pairs = C.core_pairs(rows)
    assert pairs == {"gemm_core": {"ag_gemm:goal:M=8,N=8,K=8": (103.0, 100.0)}, "decode_gemm": {"s1": (9.0, 10.0)},
                     "grouped_gemm": {"g": (5.0, 8.0)}}
    table = C.format_core_tables(rows)
    assert "gemm_core: ours / cublas time (goal <= 1.02): 0 of 1 met" in table and "x 1.030  *" in table
    assert "decode_gemm: ours / cublas time (goal <= 1): 1 of 1 met" in table
    path = tmp_path / "h200.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(C.load_core_rows(str(path))) == len(rows) - 1  # the 2-rank row is not a core row
    assert {r["run_id"] for r in C.load_core_rows(str(path), "r1")} == {"r1"}
    assert {r["run_id"] for r in C.load_core_rows(str(path), "r1,r2")} == {"r1", "r2"}
    with pytest.raises(ValueError, match="no compute-core rows of run"):
        C.load_core_rows(str(path), "nope")
    C.main(["--render", str(path), "--plot", str(tmp_path / "cores.png")])
    shown = capsys.readouterr().out
    assert "grouped_gemm: ours / torch_grouped_mm time (goal <= 1): 1 of 1 met" in shown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not importable" in shown
    else:
        assert (tmp_path / "cores.png").stat().st_size > 0


def test_more_than_one_rank_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", "2", "--mode", "cpu", "cores", "--",
                          "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "run it with -n 1" in out.stdout + out.stderr
