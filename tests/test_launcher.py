"""The launcher (`triton-dist run`) on the CPU world: success, a raising rank, a hanging world, stragglers,
``init`` outside a launcher, modules, and argument errors. Every world must end with no process left behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triton_dist import cli
from triton_dist.runtime import launcher
from triton_dist.runtime.config import MULTICAST_OFF_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TRITON_DIST_RUN_ID", "TRITON_DIST_LAUNCH_MODE", "TRITON_DIST_RUN_TIMEOUT",
              "TRITON_DIST_STRAGGLER_TIMEOUT")


def _env(pid_dir=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if pid_dir is not None:
        env["TRITON_DIST_TEST_PID_DIR"] = str(pid_dir)
    env.update(extra)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell job inherits SIGINT ignored


def _launcher(*args, pid_dir=None, **extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "triton_dist", *map(str, args)]
    return subprocess.Popen(cmd, env=_env(pid_dir, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for the launcher; past ``timeout`` SIGTERM it (so it stops its ranks) and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        pytest.fail(f"the launcher ran past {timeout} s; stderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(*args, pid_dir=None, timeout=40, **extra) -> subprocess.CompletedProcess:
    return _finish(_launcher(*args, pid_dir=pid_dir, **extra), timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _assert_no_orphans(pid_dir: Path, expected_files: int) -> None:
    files = sorted(pid_dir.glob("*.pid"))
    assert len(files) == expected_files, [f.name for f in files]
    pids = {f.name: int(f.read_text()) for f in files}
    deadline = time.monotonic() + 3.0
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
    for pid in survivors.values():  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes outlived the launcher: {survivors}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nranks", [2, 3])
def test_world_runs_and_sees_peers(nranks, tmp_path):
    res = _run("run", "-n", nranks, "--mode", "cpu", SCRIPTS / "ok_world.py", pid_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == [f"rank {r} ok" for r in range(nranks)]
    _assert_no_orphans(tmp_path, nranks)


@pytest.mark.timeout(120)
def test_ten_init_finalize_cycles_in_one_process():
    """finalize() releases every op context and a later init() joins a fresh world (issue 11: it hung in 2 of 4)."""
    res = _run("run", "-n", 3, "--mode", "cpu", SCRIPTS / "reinit.py", "10", timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(res.stdout.splitlines()) == [f"rank {r}: 10 worlds ok" for r in range(3)]


@pytest.mark.timeout(60)
def test_raising_rank_stops_the_world(tmp_path):
    start = time.monotonic()
    res = _run("run", "-n", 3, "--mode", "cpu", SCRIPTS / "raise_on_rank.py", pid_dir=tmp_path)
    assert time.monotonic() - start < 30
    assert res.returncode == 1
    assert "boom from rank 1" in res.stderr
    assert "triton-dist: rank 1 exited with code 1; stopping ranks still running:" in res.stderr
    _assert_no_orphans(tmp_path, 3)


@pytest.mark.timeout(60)
def test_hanging_world_times_out(tmp_path):
    start = time.monotonic()
    res = _run("run", "-n", 2, "--mode", "cpu", "--timeout", 8, SCRIPTS / "hang.py", pid_dir=tmp_path)
    assert 8 <= time.monotonic() - start < 30
    assert res.returncode == 124, res.stderr
    assert ("triton-dist: the world made no progress within 8 s; ranks still running: [0, 1]; stopping them"
            in res.stderr)
    _assert_no_orphans(tmp_path, 4)  # two ranks and the helper process each of them started


@pytest.mark.timeout(30)
def test_straggler_deadline(tmp_path):
    res = _run("run", "-n", 3, "--mode", "cpu", SCRIPTS / "straggler.py", pid_dir=tmp_path, timeout=25,
               TRITON_DIST_STRAGGLER_TIMEOUT="2")
    assert res.returncode == 124, res.stderr
    assert "triton-dist: the world made no progress within 2 s; ranks still running: [1, 2]" in res.stderr
    assert "ranks [0] exited 0 first" in res.stderr
    _assert_no_orphans(tmp_path, 3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_launcher_stops_the_world(sig, tmp_path):
    proc = _launcher("run", "-n", 2, "--mode", "cpu", SCRIPTS / "sleeper.py", pid_dir=tmp_path)
    deadline = time.monotonic() + 20
    while len(list(tmp_path.glob("rank?.pid"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    res = _finish(proc, 15)
    assert res.returncode == 130, res.stderr
    assert "stopping ranks still running: [0, 1]" in res.stderr
    _assert_no_orphans(tmp_path, 4)


@pytest.mark.timeout(30)
def test_init_outside_a_launcher_says_how_to_launch():
    res = subprocess.run([sys.executable, "-c", "import triton_dist; triton_dist.init()"], env=_env(),
                         capture_output=True, text=True, timeout=25)
    assert res.returncode != 0
    assert "triton-dist run" in res.stderr


@pytest.mark.timeout(30)
def test_run_module_passes_arguments_untouched():
    res = _run("run", "-n", 2, "--mode", "cpu", "-m", "echo_rank", "-n", "7", "--flag", "x y")
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    assert lines == [f"module rank {r}: RANK={r} WORLD_SIZE=2 LOCAL_RANK={r} TRITON_INTERPRET=1 "
                     f"TRITON_DIST_BACKEND=cpu args=['-n', '7', '--flag', 'x y']" for r in range(2)]


@pytest.mark.timeout(30)
def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    assert cli.main(["run", "-n", "2", "--mode", "cpu", str(tmp_path / "missing.py")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing.py" in err and "-m" in err
    monkeypatch.setattr(launcher, "_cuda_device_count", lambda: 0)
    assert cli.main(["run", "-n", "1000", "--mode", "gpu", str(SCRIPTS / "ok_world.py")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "--mode cpu for a CPU world of 1000 ranks" in err
    monkeypatch.setattr(launcher, "_cuda_device_count", lambda: 2)
    assert cli.main(["run", "-n", "1000", "--mode", "gpu", str(SCRIPTS / "ok_world.py")]) == 2
    err = capsys.readouterr().err
    assert "1000 ranks in GPU mode" in err and "only 2 CUDA GPU(s) are visible" in err and "--share-gpus" in err
    for argv, match in [(["bench", "no_such_bench"], "primitives"), (["run", "-n", "0", "x.py"], "positive integer"),
                        (["demo", "--what"], "unrecognized arguments")]:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(nprocs=0), "positive integer"), (dict(nprocs="two"), "positive integer"),
    (dict(mode="tpu"), "mode must be one of"), (dict(timeout=-1), "positive number"),
    (dict(straggler_timeout="soon"), "seconds"), (dict(grace=-1), "grace")])
def test_launch_rejects_bad_arguments(kwargs, match):
    kwargs = {"nprocs": 2, "mode": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        launcher.launch(kwargs.pop("nprocs"), str(SCRIPTS / "ok_world.py"), [], **kwargs)


def test_mode_and_nprocs_resolution(monkeypatch):
    monkeypatch.setenv("TRITON_DIST_LAUNCH_MODE", "cpu")
    assert launcher.resolve_mode("auto") == "cpu"
    assert launcher.resolve_mode("gpu") == "gpu"
    assert launcher.resolve_nprocs("auto", "cpu") == 4
    assert launcher.resolve_nprocs(3, "cpu") == 3
    monkeypatch.setenv("TRITON_DIST_LAUNCH_MODE", "quantum")
    with pytest.raises(ValueError, match="TRITON_DIST_LAUNCH_MODE"):
        launcher.resolve_mode("auto")


def test_gpu_command_and_env_force_multicast_off():
    assert launcher.gpu_command(4)[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "triton_dist.runtime._trampoline"]
    env = launcher.gpu_env({"NCCL_NVLS_ENABLE": "1", "NVSHMEM_DISABLE_NVLS": "0", "OMP_NUM_THREADS": "8"},
                           "pkg.mod", ["--m", "1151"], module=True)
    assert json.loads(env["TRITON_DIST_TARGET"]) == {"target": "pkg.mod", "args": ["--m", "1151"], "module": True}
    assert {k: env[k] for k in MULTICAST_OFF_ENV} == MULTICAST_OFF_ENV
    assert env["OMP_NUM_THREADS"] == "8"
    assert launcher.gpu_env({})["OMP_NUM_THREADS"] == "1"
    env = launcher.cpu_rank_env({"NCCL_NVLS_ENABLE": "1"}, 2, 3, 12345, "abc")
    assert env["RANK"] == env["LOCAL_RANK"] == "2" and env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "3"
    assert env["MASTER_PORT"] == "12345" and env["TRITON_INTERPRET"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"


def test_demo_without_tutorial_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "repo_root", lambda: str(tmp_path))
    assert cli.main(["demo", "-n", "2", "--mode", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "02_intra_node_allgather.py" in err and "missing" in err


def test_trampoline_passes_script_arguments_untouched(tmp_path):
    """GPU ranks start through the trampoline: options like --m must reach the script, not torchrun."""
    script = str(SCRIPTS / "echo_rank.py")
    env = dict(os.environ, RANK="0", PYTHONPATH=str(ROOT),
               TRITON_DIST_TARGET=json.dumps({"target": script, "args": ["--m", "1151", "-n"], "module": False}))
    out = subprocess.run([sys.executable, "-m", "triton_dist.runtime._trampoline"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "args=['--m', '1151', '-n']" in out.stdout
