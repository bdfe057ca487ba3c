"""The tutorials run as their users run them: through `triton-dist run` on a CPU world, checked against torch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "triton_dist", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# Three ranks: an odd world (neighbours wrap, chunks do not pair up) covers what two would; one run per tutorial
# keeps the suite's time down.
@pytest.mark.parametrize("n", [3])
def test_tutorial_01_notify_wait(n):
    out = _run(["run", "-n", str(n), "--mode", "cpu", "tutorials/01_notify_wait.py"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every rank received its left neighbour's data exactly" in out.stdout


def test_tutorial_02_allgather_is_the_demo():
    out = _run(["demo", "--mode", "cpu"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size" in out.stdout and "match" in out.stdout
    assert any(line.split()[-1] == "yes" for line in out.stdout.splitlines() if line.strip().startswith("match"))


@pytest.mark.parametrize("n", [3])
@pytest.mark.parametrize("script", ["tutorials/03_ag_gemm.py", "tutorials/04_gemm_rs.py",
                                    "tutorials/05_ll_allreduce.py", "tutorials/06_gemm_rs_decomposed.py",
                                    "tutorials/07_split_k_decode.py"])
def test_tutorials_03_to_07_match_torch(script, n):
    out = _run(["run", "-n", str(n), "--mode", "cpu", script])
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("match")]
    assert verdicts == ["yes"], out.stdout


def test_tutorial_08_matches_torch():
    """Split-KV decoding within a rank and across 2 (its kernels are per rank: a 3-rank run would add only time)."""
    out = _run(["run", "-n", "2", "--mode", "cpu", "tutorials/08_split_kv_decode.py"])
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("match")]
    assert verdicts == ["yes"], out.stdout


@pytest.mark.parametrize("n", [3])
def test_tutorial_09_ep_dispatch_combine_matches_torch_and_library(n):
    """Dispatch/combine from the primitives, exact vs torch and EPLowLatencyContext on every rank."""
    out = _run(["run", "-n", str(n), "--mode", "cpu", "tutorials/09_ep_dispatch_combine.py"])
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(ranks) == n and all(line.endswith("exact vs torch and EPLowLatencyContext") for line in ranks), \
        out.stdout
    verdicts = [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("match")]
    assert verdicts == ["yes"], out.stdout


def test_tutorial_10_tensor_parallel_model_modes_agree():
    """A random HF-layout checkpoint written, loaded by shards at TP=2, every mode's logits and greedy tokens equal."""
    out = _run(["run", "-n", "2", "--mode", "cpu", "tutorials/10_tensor_parallel_model.py"])
    assert out.returncode == 0, out.stderr[-3000:]
    modes = [line for line in out.stdout.splitlines() if line.startswith("mode ")]
    assert len(modes) == 4 and all("identical" in line for line in modes), out.stdout
    verdicts = [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("match")]
    assert verdicts == ["yes"], out.stdout
