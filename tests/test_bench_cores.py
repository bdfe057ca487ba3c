"""The compute-cores benchmark: model projections and their tensor-parallel shards, the group cases, the tolerance, and
its --smoke path end to end on a one-rank CPU world (the decode core against torch.matmul, the grouped core against
torch._grouped_mm, each checked before it is timed)."""
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


def test_more_than_one_rank_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", "2", "--mode", "cpu", "cores", "--",
                          "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "run it with -n 1" in out.stdout + out.stderr
