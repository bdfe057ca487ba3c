"""The shared-GPU world's host logic, checked without a GPU: the launcher's --share-gpus / --no-mps, the private MPS
daemon's life cycle (with a stand-in control binary), the per-rank SM share, the heap-fits check and the IPC arena's
order of calls (with a stand-in driver). The GPU runs of the same paths are the suite's shared worlds
(scripts/gpu_suite.sh on a one-GPU machine)."""
import os
import stat
import textwrap
import time

import pytest
import torch

import triton_dist
from triton_dist import cli
from triton_dist.runtime import heap, launcher, mps, world
from triton_dist.runtime.config import SHARE_GPUS_ENV, Config
from triton_dist.testing import ProcessWorld

# A stand-in for nvidia-cuda-mps-control: `-d` starts a "daemon" (a shell of the same name that lives while the
# control file exists); reading "quit" on stdin removes the file. Its process name is what the real one's is.
FAKE_CONTROL = textwrap.dedent("""\
    #!/bin/bash
    if [ "$1" = "-d" ]; then
        touch "$CUDA_MPS_PIPE_DIRECTORY/control"
        echo started > "$CUDA_MPS_LOG_DIRECTORY/control.log"
        ( while [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; do sleep 0.05; done ) > /dev/null 2>&1 &
        exit 0
    fi
    read cmd
    [ "$cmd" = "quit" ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
    """)


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    binary = tmp_path / "bin" / mps.CONTROL
    binary.parent.mkdir()
    binary.write_text(FAKE_CONTROL)
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", str(tmp_path / "no_system_daemon"))
    return binary


def test_private_daemon_starts_serves_and_stops(fake_control, monkeypatch):
    monkeypatch.delenv(mps.ACTIVE_THREADS_ENV, raising=False)
    daemon = mps.for_shared_world(ranks_per_gpu=3)
    assert isinstance(daemon, mps.PrivateMPS)
    assert set(daemon.env) == {mps.PIPE_ENV, mps.LOG_ENV, mps.ACTIVE_THREADS_ENV}
    # each of 3 ranks is capped at most at its share of the SMs, at a cap where cuBLAS is right (25 %, not 33 %)
    assert daemon.env[mps.ACTIVE_THREADS_ENV] == "25"
    assert mps.client_env_active(daemon.env) and not mps.client_env_active({})
    assert mps._daemon_pids(daemon.pipe_dir), "the daemon process is found by its pipe directory"
    with daemon as env:
        assert env == daemon.env
    deadline = time.monotonic() + 5
    while mps._daemon_pids(daemon.pipe_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mps._daemon_pids(daemon.pipe_dir) and not os.path.exists(daemon.root)
    daemon.stop()  # idempotent


def test_share_percentage_leaves_each_rank_its_share_at_a_cap_where_cublas_is_right():
    got = {n: mps.share_percentage(n) for n in (1, 2, 3, 4, 5, 8)}
    assert got == {1: 100, 2: 50, 3: 25, 4: 25, 5: 20, 8: 12}, got
    assert all(n * p <= 100 for n, p in got.items())


def test_a_cap_with_no_known_safe_value_warns(fake_control, monkeypatch, capsys):
    monkeypatch.delenv(mps.ACTIVE_THREADS_ENV, raising=False)
    daemon = mps.for_shared_world(ranks_per_gpu=5)
    try:
        assert daemon.env[mps.ACTIVE_THREADS_ENV] == "20"
        assert "torch.matmul (cuBLAS) may return wrong results" in capsys.readouterr().err
    finally:
        daemon.stop()


def test_no_second_daemon_when_one_serves(fake_control, monkeypatch):
    first = mps.PrivateMPS.start()
    try:
        monkeypatch.setenv(mps.PIPE_ENV, first.pipe_dir)
        again = mps.PrivateMPS.start_if_possible()
        assert isinstance(again, mps.NoMPS) and again.env == {}
        monkeypatch.setenv(mps.ACTIVE_THREADS_ENV, "70")  # the user's own cap is kept
        assert mps.for_shared_world(ranks_per_gpu=2).env == {}
        monkeypatch.delenv(mps.ACTIVE_THREADS_ENV)
        assert mps.for_shared_world(ranks_per_gpu=2).env == {mps.ACTIVE_THREADS_ENV: "50"}
    finally:
        first.stop()


def test_no_mps_keeps_ranks_off_any_daemon(fake_control):
    opted_out = mps.for_shared_world(use_mps=False)
    assert opted_out.env == mps.OPT_OUT_ENV and not mps.client_env_active(opted_out.env)
    opted_out.stop()


def test_missing_control_binary_means_time_slicing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", str(tmp_path / "none"))
    assert isinstance(mps.for_shared_world(), mps.NoMPS)
    with pytest.raises(RuntimeError, match="not installed.*--no-mps"):
        mps.PrivateMPS.start()


def test_daemon_that_fails_to_start_is_reported(tmp_path, monkeypatch, capsys):
    binary = tmp_path / mps.CONTROL
    binary.write_text("#!/bin/bash\necho 'cannot start' >&2\nexit 3\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", str(tmp_path / "none"))
    assert isinstance(mps.for_shared_world(), mps.NoMPS)
    err = capsys.readouterr().err
    assert "cannot start" in err and "time-slice" in err


def test_mps_command_line(fake_control, capsys):
    assert mps.main(["start"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export ") and mps.PIPE_ENV in line
    root = dict(kv.split("=", 1) for kv in line.split()[1:])["TRITON_DIST_MPS_ROOT"]
    assert os.path.isdir(root)
    assert cli.main(["mps", "stop", root]) == 0 and not os.path.exists(root)
    assert mps.main(["restart"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["mps", "stop"])


def test_more_ranks_than_gpus_names_share_gpus(monkeypatch):
    monkeypatch.setattr(launcher, "_cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 CUDA GPU.*--share-gpus"):
        launcher.resolve_nprocs(4, "gpu")
    assert launcher.resolve_nprocs(4, "gpu", share_gpus=True) == 4


def test_share_gpus_without_gpus_says_cpu_world(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "_cuda_device_count", lambda: 0)
    assert cli.main(["run", "-n", "2", "--share-gpus", "x.py"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "--mode cpu" in err
    monkeypatch.setattr(launcher, "_cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="asks for a CPU world"):
        launcher.launch(2, "x.py", mode="cpu", share_gpus=True)


def test_shared_gpu_env_of_torchrun():
    env = launcher.gpu_env({}, "s.py", share_gpus=True, mps_env={mps.PIPE_ENV: "/tmp/p"})
    assert env[SHARE_GPUS_ENV] == "1" and env[mps.PIPE_ENV] == "/tmp/p"
    plain = launcher.gpu_env({}, "s.py", mps_env={mps.PIPE_ENV: "/tmp/p"})
    assert SHARE_GPUS_ENV not in plain and mps.PIPE_ENV not in plain
    opts, _ = cli.build_parser().parse_known_args(["run", "-n", "4", "--share-gpus", "--no-mps", "s.py", "--x"])
    assert opts.share_gpus and opts.no_mps and opts.args == ["--x"]


def test_process_world_refuses_share_gpus_on_cpu():
    with pytest.raises(ValueError, match="CPU world"):
        ProcessWorld(2, backend="cpu", share_gpus=True)


class _FakeProps:
    multi_processor_count = 132


def test_num_sms_is_the_ranks_share(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _FakeProps())
    w = world.World(0, 4, 0, 4, torch.device("cuda", 0), None, "cuda", None, shared_gpu=True, ranks_per_device=3)
    assert w.num_sms == 32  # the launcher's cap for 3 ranks (25 %, where cuBLAS is right) of 132 SMs, whole TPCs
    w.ranks_per_device = 2
    assert w.num_sms == 66
    w.ranks_per_device = 4
    assert w.num_sms == 32
    w.ranks_per_device = 1
    assert w.num_sms == 132
    w.ranks_per_device, w.mps = 2, True
    monkeypatch.setenv(mps.ACTIVE_THREADS_ENV, "50")
    assert w.num_sms == 132, "under an MPS cap the device reports the capped count itself"
    assert world.World(0, 2, 0, 2, torch.device("cpu"), None, "cpu", None).num_sms == 1
    assert "shared_gpu=True" in repr(w) and "host_backend='gloo'" in repr(w)


def test_heap_that_does_not_fit_fails_with_sizes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 << 30, 140 << 30))
    monkeypatch.setattr(world.dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(world.dist, "all_reduce", lambda t, op=None, group=None: None)
    world._check_heap_fits(2 << 30, torch.device("cuda", 0), 4, None)  # 8 GiB of 10 GiB free: fits
    with pytest.raises(RuntimeError, match=r"4 x 4.0 GiB = 16.0 GiB.*10.0 GiB free.*TRITON_DIST_HEAP_SIZE=2304M"):
        world._check_heap_fits(4 << 30, torch.device("cuda", 0), 4, None)


class _FakeDriver:
    """Records the IPC arena's driver calls; each rank 'allocates' at a distinct 2 MiB-aligned address."""

    def __init__(self, rank):
        self.calls, self.rank = [], rank

    def mem_alloc(self, n):
        self.calls.append(("alloc", n))
        return (1 + self.rank) << 32

    def ipc_get_mem_handle(self, ptr):
        return ptr.to_bytes(8, "little") * 8

    def ipc_open_mem_handle(self, h):
        self.calls.append(("open", int.from_bytes(h[:8], "little")))
        return int.from_bytes(h[:8], "little") + (1 << 40)  # mapped elsewhere in this process

    def ipc_close_mem_handle(self, ptr):
        self.calls.append(("close", ptr))

    def mem_free(self, ptr):
        self.calls.append(("free", ptr))


def test_ipc_arena_maps_every_peer_and_frees_last(monkeypatch):
    from triton_dist.runtime import _cuda_driver
    drv = _FakeDriver(rank=1)
    for name in ("mem_alloc", "ipc_get_mem_handle", "ipc_open_mem_handle", "ipc_close_mem_handle", "mem_free"):
        monkeypatch.setattr(_cuda_driver, name, getattr(drv, name))
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(heap.torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(heap.torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(heap.torch.distributed, "barrier", lambda group=None: order.append("barrier"))

    def all_gather_object(out, obj, group=None):
        for r in range(3):
            out[r] = ((1 + r) << 32).to_bytes(8, "little") * 8
    monkeypatch.setattr(heap.torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(heap, "_device_bytes", lambda ptr, n, device: ("bytes", ptr, n))
    arena = heap.SharedGPUArena(4 << 20, torch.device("cuda", 0), None)
    assert arena.bases == [(1 << 32) + (1 << 40), 2 << 32, (3 << 32) + (1 << 40)]
    assert arena.peer_bytes(2) == ("bytes", (3 << 32) + (1 << 40), 4 << 20)
    assert drv.calls == [("alloc", 4 << 20), ("open", 1 << 32), ("open", 3 << 32)]
    monkeypatch.setattr(drv, "mem_free", lambda ptr: (order.append("free"), drv.calls.append(("free", ptr))))
    monkeypatch.setattr(drv, "ipc_close_mem_handle", lambda ptr: (order.append("close"),
                                                                  drv.calls.append(("close", ptr))))
    for name in ("ipc_close_mem_handle", "mem_free"):
        monkeypatch.setattr(_cuda_driver, name, getattr(drv, name))
    arena.close()
    assert order == ["close", "close", "barrier", "free"], "peers unmapped, everyone done, then freed"
    arena.close()  # idempotent
    assert order.count("free") == 1


def test_watchdog_record_names_program_and_launch():
    from triton_dist.runtime import device_state
    text = device_state.describe([2, 3, 0x7F00, 498, 497, 30, 13, 32])
    assert "rank 3 waited" in text and "for value 498, last saw 497 (program 13 of 32, SM 30)" in text
    assert "under MPS every rank on this GPU fails with it" in text


def test_a_world_that_fits_its_gpus_starts_no_daemon(fake_control, monkeypatch):
    monkeypatch.delenv(mps.ACTIVE_THREADS_ENV, raising=False)
    assert isinstance(mps.for_world(2, 2), mps.NoMPS) and mps.for_world(2, 2).env == {}
    daemon = mps.for_world(5, 2)  # 3 ranks on a GPU at most
    try:
        assert isinstance(daemon, mps.PrivateMPS) and daemon.env[mps.ACTIVE_THREADS_ENV] == "25"
    finally:
        daemon.stop()
    assert mps.for_world(4, 1, use_mps=False).env == mps.OPT_OUT_ENV


def test_a_fault_from_another_mps_client_says_where_to_look(monkeypatch):
    """Under MPS one rank's trap reaches every client on the GPU: a rank whose own record is empty says so."""
    from triton_dist.runtime import device_state

    def fault(device=None):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    monkeypatch.setattr(device_state, "_record", None)
    w = world.World(0, 2, 0, 2, torch.device("cuda", 0), None, "cuda", None, shared_gpu=True, ranks_per_device=2,
                    mps=True)
    with pytest.raises(RuntimeError, match="unspecified launch failure") as info:
        w.synchronize()
    assert any("the cause is in another rank's message" in n for n in getattr(info.value, "__notes__", []))
    w.mps = False  # time-sliced ranks: a fault stays in its own context, no note
    with pytest.raises(RuntimeError) as info:
        w.synchronize()
    assert not getattr(info.value, "__notes__", [])
    # a peer reported a mismatch (its check trapped, which stopped this rank's kernel): CallMismatch quoting it
    store = _DictStore()
    peer = world.World(1, 2, 1, 2, torch.device("cuda", 0), None, "cuda", None, store=store)
    peer.report_mismatch("rank 1 saw signature 0x7 against 0x9")
    w.mps, w.store, w.config = True, store, Config("cuda", None, False, 5.0)
    with pytest.raises(triton_dist.CallMismatch, match="rank 1 found the ranks' calls differ: rank 1 saw signature"):
        w.synchronize()


class _DictStore:
    """The three calls of a c10d store that the mismatch reports use."""

    def __init__(self):
        self.kv = {}

    def set(self, key, value):
        self.kv[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.kv for k in keys)

    def get(self, key):
        return self.kv[key]


def test_a_trapped_kernel_whose_sync_never_returns_raises_the_record(monkeypatch):
    """Time-sliced shared GPU (no MPS): when a kernel trapped (the record is filled) but torch.cuda.synchronize
    blocks for good, synchronize raises the record's error after TRAP_GRACE_S instead of hanging."""
    import threading
    from triton_dist.runtime import device_state
    release = threading.Event()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: release.wait(30))
    rec = torch.zeros(8, dtype=torch.int64)
    rec[:8] = torch.tensor([3, 0, 1, 4, 3, 1, 5, 66])  # a failed split check (code 1) of rank 0, program 5 of 66
    monkeypatch.setattr(device_state, "_record", rec)
    monkeypatch.setattr(device_state, "_world", None)
    monkeypatch.setattr(world, "TRAP_GRACE_S", 0.2)
    w = world.World(0, 2, 0, 2, torch.device("cuda", 0), None, "cuda", None, shared_gpu=True, ranks_per_device=2)
    t = time.monotonic()
    with pytest.raises(triton_dist.CallMismatch, match="rank 0 expects 4 rows from rank 1") as info:
        w.synchronize()
    release.set()
    assert time.monotonic() - t < 5
    assert any("torch.cuda.synchronize had not returned" in n for n in info.value.__notes__)
    rec[0] = 0  # nothing recorded: the sync's own outcome
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    w.synchronize()
