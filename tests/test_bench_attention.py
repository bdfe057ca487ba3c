"""The attention benchmark: its --smoke path end to end on CPU worlds (the local decode, contiguous and paged, and the
prefill against torch SDPA at one rank; the distributed decode against its NCCL-style baseline at two; each checked
before it is timed), the paged cache it builds, and the tables and plot drawn from recorded rows (--render)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_dist.bench import attention as A

ROOT = Path(__file__).resolve().parents[1]


def _bench(n, tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", str(n), "--mode", "cpu", "attention",
                          "--", "--smoke", "--out", str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert "not timed" not in out.stderr, out.stderr[-2000:]
    return out, rows


def test_smoke_local_kernels_against_sdpa(tmp_path):
    out, rows = _bench(1, tmp_path)
    got = {(r["op"], r["provider"]) for r in rows}
    assert got == {("flash_decode", "triton_dist:flash_decode"), ("flash_decode", "triton_dist:flash_decode_paged"),
                   ("flash_decode", "torch_sdpa"), ("flash_attn", "triton_dist:flash_attn"),
                   ("flash_attn", "torch_sdpa")}, got
    assert all(r["world_size"] == 1 and r["gbps"] is not None for r in rows)
    assert "flash_decode: ours / torch_sdpa time" in out.stdout and "flash_attn: ours / torch_sdpa time" in out.stdout


def test_smoke_distributed_decode(tmp_path):
    out, rows = _bench(2, tmp_path)
    assert {r["provider"] for r in rows} == {"triton_dist:sp_flash_decode", "triton_dist:flash_decode+nccl"}
    assert all(r["op"] == "sp_flash_decode" and r["world_size"] == 2 for r in rows)


def test_paged_copy_holds_the_same_tokens():
    k = torch.randn(2, 32, 3, 8)
    v = torch.randn(2, 32, 3, 8)
    kp, vp, table = A.paged(k, v, 8, seed=5)
    assert table.shape == (2, 4) and sorted(table.flatten().tolist()) == list(range(8))
    for b in range(2):
        for t in range(32):
            page, slot = int(table[b, t // 8]), t % 8
            assert torch.equal(kp[page, slot], k[b, t]) and torch.equal(vp[page, slot], v[b, t])


def _row(op, shape, provider, us, run="r1", gbps=4000.0, tflops=400.0):
    return {"op": op, "shape": shape, "provider": provider, "median_us": us, "run_id": run, "world_size": 1,
            "gbps": gbps, "tflops": tflops, "card": "NVIDIA H200", "date": "2026-12-01", "shared_gpu": False}


def test_pairs_tables_and_render_from_recorded_rows(tmp_path, capsys):
    rows = [_row("flash_decode", "d1", "triton_dist:flash_decode", 10.0),
            _row("flash_decode", "d1", "triton_dist:flash_decode_paged", 12.0),
            _row("flash_decode", "d1", "torch_sdpa", 11.0),
            _row("flash_attn", "p1", "triton_dist:flash_attn", 100.0),
            _row("flash_attn", "p1", "torch_sdpa", 95.0),
            _row("flash_attn", "p1", "triton_dist:flash_attn", 90.0, run="r2"),  # a later run replaces the first
            _row("flash_decode", "lonely", "torch_sdpa", 1.0),  # no pair: left out
            _row("decode_gemm", "x", "cublas", 1.0)]  # another bench's row: ignored
    pairs = A.attention_pairs(rows)
    assert {k: {s: v[:2] for s, v in d.items()} for k, d in pairs.items()} == {
        "flash_decode": {"d1": (10.0, 11.0), "d1 [paged]": (12.0, 11.0)}, "flash_attn": {"p1": (90.0, 95.0)}}
    table = A.format_attention_tables(rows)
    assert "flash_decode: ours / torch_sdpa time (goal <= 1): 1 of 2 met" in table
    assert "flash_attn: ours / torch_sdpa time (goal <= 1.111): 1 of 1 met" in table
    path = tmp_path / "h200.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(A.load_attention_rows(str(path))) == len(rows) - 1
    assert {r["run_id"] for r in A.load_attention_rows(str(path), "r1")} == {"r1"}  # r2 alone has no baseline
    with pytest.raises(ValueError, match="no attention rows of run"):
        A.load_attention_rows(str(path), "nope")
    A.main(["--render", str(path), "--plot", str(tmp_path / "attention.png")])
    shown = capsys.readouterr().out
    assert "flash_attn: ours / torch_sdpa time" in shown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not importable" in shown
    else:
        assert (tmp_path / "attention.png").stat().st_size > 0
