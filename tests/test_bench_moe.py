"""The MoE benchmark: its --smoke path end to end on a CPU world of two ranks (the low-latency dispatch / combine, bf16
and fp8, against the torch all_to_all_single baselines; every round trip checked bit for bit before it is timed; the
tensor-parallel layer against torch + collectives, checked against fp32), the routing and payload helpers, and the
tables and plot drawn from recorded rows (--render)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_dist.bench import moe as M

ROOT = Path(__file__).resolve().parents[1]


def _bench(n, tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "triton_dist", "bench", "-n", str(n), "--mode", "cpu", "moe",
                          "--", "--smoke", "--out", str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert "not timed" not in out.stderr, out.stderr[-2000:]
    return out, rows


def test_smoke_dispatch_combine_against_all_to_all(tmp_path):
    out, rows = _bench(2, tmp_path)
    ours = ("triton_dist:ep_ll", "triton_dist:ep_ll_fp8")
    got = {(r["op"], r["provider"]) for r in rows}
    assert got == {(op, p) for op in M.OPS for p in ours + ("torch_all_to_all", "torch_all_to_all_fp8")}, got
    assert len(rows) == len(got)
    assert all(r["shape"] == "T=4,H=128,k=2,E=4,world=2" and r["world_size"] == 2 for r in rows)
    assert all(r["shared_gpu"] is False for r in rows)  # a CPU world shares no GPU
    assert all(r["gbps"] is not None and r["tflops"] is None for r in rows)
    assert len({r["run_id"] for r in rows}) == 1
    assert f"{M.SYMM_MEM} not run: PyTorch's symmetric memory needs CUDA" in out.stdout + out.stderr
    for op in M.OPS:
        assert f"{op}: ours / torch_all_to_all time" in out.stdout


def test_smoke_normal_dispatch_and_tensor_parallel_layer(tmp_path):
    out, rows = _bench(2, tmp_path, "--cases", "ep_normal,tp")
    tp = [r for r in rows if r["op"] == M.TP_OP]
    assert {r["provider"] for r in tp} == {"triton_dist:tp_moe", "torch_nccl"} and len(tp) == 2
    assert all(r["shape"] == "T=8,H=64,I=64,k=2,E=4,world=2" and r["tflops"] is not None for r in tp)
    assert "tp_moe: ours / torch_nccl time" in out.stdout
    ep = [r for r in rows if r["op"] != M.TP_OP]  # ep_normal: 8 tokens per rank, every round trip checked exactly
    assert {(r["op"], r["provider"]) for r in ep} == {(op, p) for op in M.OPS
                                                      for p in ("triton_dist:ep_normal", "torch_all_to_all")}
    assert all(r["shape"] == "T=8,H=128,k=2,E=4,world=2" for r in ep) and len(ep) == 6
    assert M.TPCase().shape(8) == "T=4096,H=2048,I=768,k=8,E=128,world=8"
    h = torch.randn(3, 8)
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(M.gate_up_act(h), torch.nn.functional.silu(gate) * up)


def test_routing_and_payload():
    ids = M.routing(16, 8, 32, seed=3)
    assert ids.shape == (16, 8) and ids.dtype == torch.int64
    assert all(len(set(row.tolist())) == 8 for row in ids) and 0 <= int(ids.min()) and int(ids.max()) < 32
    assert torch.equal(ids, M.routing(16, 8, 32, seed=3)) and not torch.equal(ids, M.routing(16, 8, 32, seed=4))
    case = M.EPCase()
    assert case.shape(8) == "T=128,H=7168,k=8,E=256,world=8"
    assert case.payload_bytes(2, False) == (128 * 8 * 7168 * 2,) * 2
    assert case.payload_bytes(2, True) == (128 * 8 * (7168 + 7168 // 32), 128 * 8 * 7168 * 2)
    assert M.smoke_case(3) == M.EPCase(4, 128, 2, 6)
    assert M.heap_bytes_for(M.smoke_case(2), 2, (False, True)) == 2 << 30
    big = M.EPCase(512, 7168, 8, 256)
    assert M.heap_bytes_for(big, 2, (False,)) >= M.context_bytes(big, 2, False) > 2 * 256 * 512 * 7168 * 2


def _row(op, shape, provider, us, run="r1", shared=False):
    return {"op": op, "shape": shape, "provider": provider, "median_us": us, "run_id": run, "world_size": 8,
            "gbps": 100.0, "tflops": None, "card": "NVIDIA H200", "date": "2026-12-01", "shared_gpu": shared}


def test_pairs_tables_and_render_from_recorded_rows(tmp_path, capsys):
    s = "T=128,H=7168,k=8,E=256,world=8"
    rows = [_row("ep_dispatch", s, "triton_dist:ep_ll", 40.0), _row("ep_dispatch", s, "torch_all_to_all", 400.0),
            _row("ep_dispatch", s, "triton_dist:ep_ll_fp8", 30.0),
            _row("ep_dispatch", s, "torch_all_to_all_fp8", 350.0),
            _row("ep_dispatch", s, M.SYMM_MEM, 60.0),  # a second baseline: in the rows, not paired
            _row("ep_combine", s, "triton_dist:ep_ll", 50.0), _row("ep_combine", s, "torch_all_to_all", 45.0),
            _row("ep_round_trip", s, "triton_dist:ep_ll", 99.0),
            _row("ep_round_trip", s, "torch_all_to_all", 800.0),
            _row("ep_round_trip", s, "triton_dist:ep_ll", 90.0, run="r2"),  # a later run replaces the first
            _row("ep_combine", "lonely", "torch_all_to_all", 1.0),  # no pair: left out
            _row("sp_flash_decode", "x", "triton_dist:sp_flash_decode", 1.0)]  # another bench's row: ignored
    pairs = M.moe_pairs(rows)
    assert {op: {k: v[:2] for k, v in d.items()} for op, d in pairs.items()} == {
        "ep_dispatch": {s: (40.0, 400.0), s + " [fp8]": (30.0, 350.0)}, "ep_combine": {s: (50.0, 45.0)},
        "ep_round_trip": {s: (90.0, 800.0)}}
    table = M.format_moe_tables(rows)
    assert "ep_dispatch: ours / torch_all_to_all time (goal <= 1): 2 of 2 met" in table
    assert "ep_combine: ours / torch_all_to_all time (goal <= 1): 0 of 1 met" in table
    path = tmp_path / "h200.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(M.load_moe_rows(str(path))) == len(rows) - 1
    assert {r["run_id"] for r in M.load_moe_rows(str(path), "r1")} == {"r1"}  # r2 alone has no baseline
    with pytest.raises(ValueError, match="no MoE rows of run"):
        M.load_moe_rows(str(path), "nope")
    M.main(["--render", str(path), "--plot", str(tmp_path / "moe.png")])
    shown = capsys.readouterr().out
    assert "ep_round_trip: ours / torch_all_to_all time" in shown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not importable" in shown
    else:
        assert (tmp_path / "moe.png").stat().st_size > 0
        shared = [dict(r, shared_gpu=True) for r in rows]  # a shared-GPU run draws too (its title marked)
        assert M.plot_moe_rows(shared, str(tmp_path / "shared.png")) == str(tmp_path / "shared.png")
