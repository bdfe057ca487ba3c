"""The world-aware autotuner (triton_dist.tune). The CPU world always uses defaults, so these tests run the measuring
path through its test hook: ``force=True`` with a fake ``timer(config, run)`` that returns chosen times per rank.
Single-process cases use a one-rank stand-in world (no collectives); the cross-rank rules run in worlds of
processes."""
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import time
import types
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import triton_dist
from triton_dist import tune

from _util import this_world
from conftest import BACKEND, new_world


@dataclasses.dataclass(frozen=True)
class Cfg:
    name: str
    block: int = 64


CONFIGS = (Cfg("a", 16), Cfg("b", 32), Cfg("c", 64))
DEFAULT = Cfg("default", 128)
KEY = ("fp16", 16, 1151, 123)


def fake_timer(times, log=None):
    """``timer(config, run)``: runs the kernel once and says it took ``times[config.name]`` us."""
    def timer(cfg, run):
        if log is not None:
            log.append(cfg.name)
        run()
        return times[cfg.name]
    return timer


def no_bench(cfg):
    raise AssertionError(f"bench({cfg}) ran, but this choice needs no measurement")


@contextlib.contextmanager
def no_collectives():
    """Any host collective fails the call."""
    with contextlib.ExitStack() as stack:
        for name in ("all_reduce", "all_gather_object", "barrier", "broadcast", "broadcast_object_list"):
            stack.enter_context(mock.patch.object(dist, name, side_effect=AssertionError(f"dist.{name} called")))
        yield


@contextlib.contextmanager
def rank_env(cache_dir, **extra):
    """On a rank: tuning on, the cache in ``cache_dir``, nothing memoised; restored afterwards."""
    vals = {"TRITON_DIST_CACHE_DIR": str(cache_dir), "TRITON_DIST_AUTOTUNE": "1", **extra}
    old = {k: os.environ.get(k) for k in vals}
    os.environ.update(vals)
    tune._reset()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tune._reset()


@pytest.fixture
def solo(tmp_path, monkeypatch):
    """A one-rank stand-in world (CPU, interpreted: tuning needs force=True), the cache in tmp_path."""
    monkeypatch.setenv("TRITON_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_DIST_AUTOTUNE", raising=False)
    tune._reset()
    yield types.SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), interpreted=True,
                                num_sms=1, group=None, host_backend="gloo")
    tune._reset()


def entries():
    return json.loads(tune.cache_path().read_text())["entries"]


# ---------------------------------------------------------------------------------------------- across ranks

def _slowest_rank_decides(cache_dir):
    w = this_world()
    with rank_env(cache_dir):
        # every rank but the last finds "a" fastest; the last finds it slowest of all
        last = w.rank == w.world_size - 1
        times = {"a": 100.0, "b": 6.0, "c": 7.0} if last else {"a": 1.0, "b": 5.0, "c": 9.0}
        got = tune.choose("t_slowest", KEY, CONFIGS, DEFAULT, lambda c: None, force=True, timer=fake_timer(times))
        return got.name, got is CONFIGS[1]


def test_slowest_rank_decides(world, tmp_path):
    # slowest-rank times: a 100, b 6, c 9 -> b everywhere, although most ranks found a fastest
    assert world.run(_slowest_rank_decides, tmp_path) == [("b", True)] * world.world_size


def _fails_on_one_rank(cache_dir):
    w = this_world()
    timed = []

    def bench(cfg):
        if cfg.name == "a" and w.rank == 1:
            raise RuntimeError("out of resource: shared memory, Required: 262144")

    with rank_env(cache_dir):
        got = tune.choose("t_one_fails", KEY, CONFIGS, DEFAULT, bench, force=True,
                          timer=fake_timer({"a": 1.0, "b": 3.0, "c": 2.0}, timed))
    return got.name, timed


def test_config_failing_on_one_rank_is_out_on_every_rank(world2, tmp_path):
    # "a" is fastest but failed its trial run on rank 1: no rank times it, both pick c
    assert world2.run(_fails_on_one_rank, tmp_path) == [("c", ["b", "c"])] * 2


def _all_fail(cache_dir):
    w = this_world()

    def bench(cfg):
        if cfg.name == "a":
            raise RuntimeError("out of resource: shared memory\nmore detail that must not appear")
        if cfg.name == "b" and w.rank == 1:
            raise ValueError(f"bad block {cfg.block}")

    with rank_env(cache_dir):
        try:
            tune.choose("t_all_fail", KEY, CONFIGS, DEFAULT, bench, force=True,
                        timer=fake_timer({"a": 1.0, "b": 1.0, "c": math.inf if w.rank == 0 else 2.0}))
        except tune.TuneError as e:
            return str(e), os.path.exists(tune.cache_path())
    return None, None


def test_all_configs_failing_raises_on_every_rank(world2, tmp_path):
    msgs = world2.run(_all_fail, tmp_path)
    assert msgs[0] == msgs[1]
    msg, wrote = msgs[0]
    assert not wrote
    assert "every config of t_all_fail (fp16, 16, 1151, 123) failed" in msg
    assert "configs[0] Cfg(name='a', block=16): all ranks: RuntimeError: out of resource: shared memory" in msg
    assert "configs[1] Cfg(name='b', block=32): rank 1: ValueError: bad block 32" in msg
    assert "configs[2] Cfg(name='c', block=64): rank 0: the timer returned inf" in msg
    assert "more detail" not in msg


def _tune_and_count_writes(cache_dir):
    real_replace = os.replace
    writes = []

    def replace(src, dst):
        writes.append(str(dst))
        real_replace(src, dst)

    err = io.StringIO()
    with rank_env(cache_dir), mock.patch("os.replace", replace), contextlib.redirect_stderr(err):
        got = tune.choose("t_cache", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                          timer=fake_timer({"a": 3.0, "b": 1.0, "c": 2.0}))
        again = tune.choose("t_cache", KEY, CONFIGS, DEFAULT, no_bench, force=True)
    return got.name, again is got, len(writes), err.getvalue(), tune.cache.hardware(this_world())


def _reuse(cache_dir):
    err = io.StringIO()
    with rank_env(cache_dir), contextlib.redirect_stderr(err):
        got = tune.choose("t_cache", KEY, CONFIGS, DEFAULT, no_bench, force=True)
    return got.name, got is CONFIGS[1], err.getvalue()


def test_cache_is_written_once_and_reused_by_a_new_world(world2, tmp_path):
    (r0, r1) = world2.run(_tune_and_count_writes, tmp_path)
    assert r0[:3] == ("b", True, 1) and r1[:3] == ("b", True, 0)  # only local rank 0 writes, once
    lines = r0[3].splitlines()
    assert lines[0] == "triton-dist tune: t_cache (fp16, 16, 1151, 123): timing 3 configs"
    assert lines[-1].startswith("triton-dist tune: t_cache (fp16, 16, 1151, 123): chose configs[1] of 3: "
                                "Cfg(name='b', block=32), 1.0 us (slowest rank); cached in ")
    assert r1[3] == ""  # rank 0 alone reports progress
    path = tmp_path / "tune.json"
    text = path.read_text()
    (entry,) = json.loads(text)["entries"].values()
    assert entry["kernel"] == "t_cache" and entry["key"] == list(KEY) and entry["world_size"] == 2
    assert entry["config"] == {"name": "b", "block": 32} and (entry["gpu"], entry["sms"]) == tuple(r0[4])
    assert {"torch", "triton", "triton_dist", "version"} <= set(entry)
    with new_world(2) as fresh:  # new processes: no memo, every rank finds the entry
        assert fresh.run(_reuse, tmp_path) == [("b", True, "")] * 2
    assert path.read_text() == text


def _cache_disagreement(shared_dir, own_dir):
    w = this_world()
    with rank_env(shared_dir):
        first = tune.choose("t_agree", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                            timer=fake_timer({"a": 1.0, "b": 2.0, "c": 3.0}))
    calls = []
    # rank 0 now reads an empty cache (as if on another node), rank 1 the one that holds "a": they tune together
    with rank_env(own_dir if w.rank == 0 else shared_dir):
        second = tune.choose("t_agree", KEY, CONFIGS, DEFAULT, calls.append, force=True,
                             timer=fake_timer({"a": 3.0, "b": 2.0, "c": 1.0}))
    return first.name, second.name, len(calls)


def test_ranks_with_different_cached_choices_tune_together(world2, tmp_path):
    shared, own = tmp_path / "shared", tmp_path / "own"
    assert world2.run(_cache_disagreement, shared, own) == [("a", "c", 6)] * 2  # trial + timed run of 3 configs


def _local_tuning(cache_dir):
    """Inside tune.local() one rank tunes a kernel the other never calls: its own timings, no collective; a
    collective call of the same key afterwards still tunes with every rank (its own memo entry)."""
    w = this_world()
    with rank_env(cache_dir):
        alone = None
        if w.rank == 0:
            with no_collectives(), tune.local():
                alone = tune.choose("t_local", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                                    timer=fake_timer({"a": 3.0, "b": 1.0, "c": 2.0})).name
                again = tune.choose("t_local", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                                    timer=fake_timer({"a": 0.0, "b": 9.0, "c": 9.0})).name  # memoised: no timing
                assert again == alone
        times = {"a": 1.0, "b": 2.0, "c": 9.0} if w.rank == 0 else {"a": 9.0, "b": 2.0, "c": 1.0}
        together = tune.choose("t_local", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                               timer=fake_timer(times)).name
    return alone, together


def test_local_tuning_needs_no_other_rank(world2, tmp_path):
    assert world2.run(_local_tuning, tmp_path) == [("b", "b"), (None, "b")]  # slowest ranks: a 9, b 2, c 9


def _rank_dependent_key(cache_dir):
    w = this_world()
    with rank_env(cache_dir):
        try:
            tune.choose("t_mismatch", ("fp16", 16 << w.rank), CONFIGS, DEFAULT, lambda c: None, force=True,
                        timer=fake_timer({"a": 1.0, "b": 2.0, "c": 3.0}))
        except triton_dist.CallMismatch as e:
            return str(e)
    return None


def test_ranks_asking_for_different_keys_raise_call_mismatch(world2, tmp_path):
    msgs = world2.run(_rank_dependent_key, tmp_path)
    assert all(m is not None and "different kernels, keys or candidate lists" in m for m in msgs), msgs


def _defaults_without_tuning(cache_dir):
    calls = []
    with rank_env(cache_dir), no_collectives():
        on = tune.enabled(), tune.enabled(force=True)
        cpu = tune.choose("t_off", KEY, CONFIGS, DEFAULT, calls.append) if this_world().interpreted else DEFAULT
        os.environ["TRITON_DIST_AUTOTUNE"] = "0"
        off = tune.choose("t_off", KEY, CONFIGS, DEFAULT, calls.append, force=True)
        off_enabled = tune.enabled(force=True)
        wrote = tune.cache_path().exists()
    return cpu is DEFAULT, off is DEFAULT, calls, wrote, on, off_enabled


def test_cpu_world_and_autotune_0_use_the_default(world2, tmp_path):
    cpu = BACKEND == "cpu"  # the CPU world uses the default unless forced; a GPU world tunes
    assert world2.run(_defaults_without_tuning, tmp_path) == [(True, True, [], False, (not cpu, True), False)] * 2


def _memoised(cache_dir):
    with rank_env(cache_dir):
        first = tune.choose("t_memo", KEY, CONFIGS, DEFAULT, lambda c: None, force=True,
                            timer=fake_timer({"a": 2.0, "b": 3.0, "c": 1.0}))
        touch = AssertionError("the file system was touched")
        with no_collectives(), mock.patch("builtins.open", side_effect=touch), \
                mock.patch("os.replace", side_effect=touch), mock.patch.object(pathlib.Path, "stat", side_effect=touch):
            again = [tune.choose("t_memo", KEY, CONFIGS, DEFAULT, no_bench, force=True) for _ in range(3)]
    return first.name, all(a is first for a in again)


def test_second_call_is_a_lookup(world2, tmp_path):
    assert world2.run(_memoised, tmp_path) == [("c", True)] * 2


# ---------------------------------------------------------------------------------------------- one process

def test_no_world_uses_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_DIST_CACHE_DIR", str(tmp_path))
    assert not triton_dist.is_initialized()
    assert tune.choose("t_no_world", KEY, CONFIGS, DEFAULT, no_bench, force=True) is DEFAULT
    assert not tune.enabled(force=True) and not (tmp_path / "tune.json").exists()


def test_bad_autotune_value_is_an_error(solo, monkeypatch):
    monkeypatch.setenv("TRITON_DIST_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match=r"TRITON_DIST_AUTOTUNE must be 0 .* or 1 .*got 'yes'"):
        tune.choose("t_env", KEY, CONFIGS, DEFAULT, no_bench, world=solo, force=True)
    with pytest.raises(ValueError, match="TRITON_DIST_AUTOTUNE"):
        tune.enabled(solo)


@dataclasses.dataclass(frozen=True)
class DtypeCfg:
    dtype: torch.dtype = torch.float16


@pytest.mark.parametrize("change, match", [
    (dict(configs="abc"), "configs must be a sequence"),
    (dict(configs=[object()]), r"configs\[0\] must be a dataclass instance or a dict"),
    (dict(configs=[CONFIGS[0], {"block": math.nan}]), r"configs\[1\] .* must round-trip through JSON"),
    (dict(default=DtypeCfg()), "default .* must round-trip through JSON"),
    (dict(key=("fp16", torch.float16)), "key .* must be JSON data"),
    (dict(key="fp16"), "key must be a tuple or dict"),
    (dict(key=(["fp16"], 16)), "key values must be hashable"),
    (dict(kernel=""), "kernel must be a non-empty str"),
    (dict(bench=None), "bench must be callable"),
    (dict(iters=0), "iters must be an int >= 1"),
    (dict(timer=3), "timer must be callable"),
    (dict(version=2), "version must be a str"),
])
def test_bad_arguments(solo, change, match):
    args = dict(kernel="t_bad", key=KEY, configs=CONFIGS, default=DEFAULT, bench=no_bench)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        tune.choose(args.pop("kernel"), args.pop("key"), args.pop("configs"), args.pop("default"), args.pop("bench"),
                    world=solo, force=True, **args)


def test_no_candidates_means_the_default(solo):
    with no_collectives():  # a shape for which the kernel has no alternatives: nothing is measured
        assert tune.choose("t_empty", KEY, [], DEFAULT, no_bench, world=solo, force=True) is DEFAULT
    assert not tune.cache_path().exists()


def test_cache_is_reused_and_invalidated_by_version_and_hardware(solo, monkeypatch):
    calls = []
    timer = fake_timer({"a": 2.0, "b": 1.0, "c": 3.0, "d": 0.5})

    def choose(configs=CONFIGS, **kw):
        tune._reset()  # a new process each time: only the file remembers
        return tune.choose("t_inv", KEY, configs, DEFAULT, calls.append, world=solo, force=True, timer=timer, **kw)

    assert choose() is CONFIGS[1] and len(calls) == 6
    assert choose() is CONFIGS[1] and len(calls) == 6  # from the file
    assert choose(version="2") is CONFIGS[1] and len(calls) == 12  # the kernel's version changed
    monkeypatch.setattr(tune.cache, "hardware", lambda world: ("NVIDIA H100 80GB HBM3", 132))
    assert choose() is CONFIGS[1] and len(calls) == 18  # another GPU
    monkeypatch.setattr(tune.cache, "hardware", lambda world: ("NVIDIA H100 80GB HBM3", 66))
    assert choose() is CONFIGS[1] and len(calls) == 24  # fewer SMs (a shared GPU)
    others = (CONFIGS[0], CONFIGS[2], Cfg("d", 8))
    assert choose(others) is others[2] and len(calls) == 30  # the stored config is no candidate any more
    assert choose(others) is others[2] and len(calls) == 30
    got = {(e["gpu"], e["sms"], e["version"]): e["config"]["name"] for e in entries().values()}
    assert got == {("cpu", 1, ""): "b", ("cpu", 1, "2"): "b", ("NVIDIA H100 80GB HBM3", 132, ""): "b",
                   ("NVIDIA H100 80GB HBM3", 66, ""): "d"}  # the retuned entry replaced the stale one


def test_corrupt_cache_file_warns_and_is_replaced(solo):
    path = tune.cache_path()
    calls = []
    for bad in ("{not json", json.dumps({"format": 99, "entries": {}})):
        path.write_text(bad)
        tune._reset()
        with pytest.warns(RuntimeWarning, match="ignoring the cache file .*tune.json") as rec:
            got = tune.choose("t_corrupt", KEY, CONFIGS, DEFAULT, calls.append, world=solo, force=True,
                              timer=fake_timer({"a": 2.0, "b": 1.0, "c": 3.0}))
        assert got is CONFIGS[1] and len([w for w in rec if "ignoring" in str(w.message)]) == 1
        assert list(entries().values())[0]["config"] == {"name": "b", "block": 32}
    assert len(calls) == 12


def test_unusable_cache_location_warns_once_and_still_chooses(solo, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_DIST_CACHE_DIR", str(blocker))  # the cache "directory" is a file
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for kernel in ("t_unusable_1", "t_unusable_2"):
            got = tune.choose(kernel, KEY, CONFIGS, DEFAULT, lambda c: None, world=solo, force=True,
                              timer=fake_timer({"a": 2.0, "b": 3.0, "c": 1.0}))
            assert got is CONFIGS[2]
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2, msgs
    assert "ignoring the cache file" in msgs[0] and "could not write the cache file" in msgs[1]


def test_capture_falls_back_to_the_default_with_one_warning(solo):
    calls = []
    args = ("t_capture", KEY, CONFIGS, DEFAULT, calls.append)
    kw = dict(world=solo, force=True, timer=fake_timer({"a": 2.0, "b": 3.0, "c": 1.0}))
    with mock.patch("torch.cuda.is_current_stream_capturing", return_value=True):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = [tune.choose(*args, **kw) for _ in range(2)]
    assert got == [DEFAULT, DEFAULT] and calls == []
    assert len(rec) == 1 and "during CUDA-graph capture" in str(rec[0].message)
    assert tune.choose(*args, **kw) is CONFIGS[2] and calls  # after capture: tuned (the fallback was not memoised)


def test_default_timer_ties_and_tty_progress(solo):
    calls = []
    got = tune.choose("t_timer", KEY, CONFIGS, DEFAULT, lambda c: calls.append(c.name), world=solo, force=True,
                      warmup=2, iters=3)  # the host clock: some candidate, each run 1 + 2 + 3 times
    assert got in CONFIGS and calls == ["a"] * 6 + ["b"] * 6 + ["c"] * 6

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    with contextlib.redirect_stderr(err):
        got = tune.choose("t_tie", {"dtype": "fp16", "m": 16}, CONFIGS, DEFAULT, lambda c: None, world=solo,
                          force=True, timer=fake_timer({"a": 2.0, "b": 1.0, "c": 1.0}))
    assert got is CONFIGS[1]  # b and c tie: the earlier candidate
    text = err.getvalue()
    assert text.startswith("\rtriton-dist tune: t_tie (dtype=fp16, m=16): 1/3 configs, best 2.0 us")
    assert "\rtriton-dist tune: t_tie (dtype=fp16, m=16): 3/3 configs, best 1.0 us" in text
    assert text.endswith("\n") and text.count("\n") == 1 and "chose configs[1] of 3" in text
    tune._reset()
    err = Tty()
    with contextlib.redirect_stderr(err):
        assert tune.choose("t_tie", {"m": 16, "dtype": "fp16"}, CONFIGS, DEFAULT, no_bench, world=solo,
                           force=True) is CONFIGS[1]  # from the cache (dict keys in any order), silently
    assert err.getvalue() == ""


def test_buckets():
    assert [tune.bucket_pow2(n) for n in (0, 1, 2, 3, 5, 16, 17, 1151)] == [1, 1, 2, 4, 8, 16, 32, 2048]
    assert tune.bucket_pow2(3, lo=16) == 16 and tune.bucket_pow2(1000, hi=256) == 256
    assert tune.bucket_pow2(100, lo=16, hi=256) == 128
    assert [tune.bucket(n, (16, 64, 256)) for n in (1, 16, 17, 64, 65, 300)] == [16, 16, 64, 64, 256, 256]
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        tune.bucket_pow2(-1)
    with pytest.raises(ValueError, match="hi must be an int >= 16"):
        tune.bucket_pow2(3, lo=16, hi=8)
    with pytest.raises(ValueError, match="strictly ascending"):
        tune.bucket(3, (64, 16))


# ---------------------------------------------------------------------------------------------- GPUs

def _tune_matmuls_on_gpu(cache_dir):
    w = this_world()
    x = {n: torch.randn(n, n, device=w.device, dtype=torch.bfloat16) for n in (256, 4096)}
    configs = ({"n": 4096}, {"n": 256})  # the second does 1/4096 of the work: it must win on every rank

    def bench(c):
        x[c["n"]] @ x[c["n"]]

    with rank_env(cache_dir), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = tune.choose("t_gpu_matmul", ("bf16",), configs, configs[0], bench)  # no force: CUDA events
        t0 = time.perf_counter()
        again = tune.choose("t_gpu_matmul", ("bf16",), configs, configs[0], bench)
        lookup_us = (time.perf_counter() - t0) * 1e6
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            bench(got)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a memoised key keeps its choice; a new one falls back to the default
            captured = tune.choose("t_gpu_matmul", ("bf16",), configs, configs[0], bench)
            new = tune.choose("t_gpu_matmul_new", ("bf16",), configs, configs[0], bench)
            bench(captured)
        graph.replay()
        torch.cuda.synchronize()
        (entry,) = json.loads(tune.cache_path().read_text())["entries"].values()
    capture_warnings = [r for r in rec if "during CUDA-graph capture" in str(r.message)]
    return (got is configs[1], again is got, captured is got, new is configs[0], len(capture_warnings), entry["gpu"],
            entry["us"] > 0, lookup_us < 1000)


@pytest.mark.gpu
@pytest.mark.skipif(BACKEND == "cpu", reason="needs a GPU world (TRITON_DIST_TEST_BACKEND=cuda)")
def test_tunes_with_cuda_events_and_keeps_graph_capture_working(world2, tmp_path):
    got = world2.run(_tune_matmuls_on_gpu, tmp_path)
    assert got[0] == got[1] and got[0][:5] == (True, True, True, True, 1) and got[0][6:] == (True, True), got
    assert got[0][5] == torch.cuda.get_device_name(0)


def test_callable_candidates_are_built_only_on_a_miss(monkeypatch, tmp_path):
    """A kernel that asks at every launch passes callables: they run at the first call of a key only."""
    monkeypatch.setenv(tune.CACHE_DIR_ENV, str(tmp_path))
    tune._reset()
    built = []

    def configs():
        built.append("configs")
        return [{"block": 16}, {"block": 32}]

    def default():
        built.append("default")
        return {"block": 16}

    for _ in range(3):  # no world: the default, memoised
        assert tune.choose("lazy", ("k",), configs, default, lambda c: None) == {"block": 16}
    assert built == ["configs", "default"]
    tune._reset()


def test_gpu_sleep_covers_the_host_enqueue_time(monkeypatch):
    """On GPUs the timed runs queue behind a sleep long enough for the host to enqueue all of them (1.5x their
    measured host time), so a kernel shorter than its Python launch is timed by the GPU, not by the host."""
    from triton_dist.tune import tuner
    slept, events = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = len(events) * 0.01  # 10 us apart, in ms
            events.append(self)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append, raising=False)
    world = types.SimpleNamespace(device=torch.device("cuda", 0))
    t = tuner._time_runs(lambda: time.sleep(0.002), world, warmup=1, iters=10)
    assert t == pytest.approx(10.0)  # the events' spacing, in us
    assert len(slept) == 1 and slept[0] >= 1.5 * 11 * 0.002 * tuner.GPU_CLOCK_HZ * 0.9, slept
    slept.clear()
    tuner._time_runs(lambda: None, world, warmup=1, iters=10)
    assert slept == [tuner.SLEEP_CYCLES]  # a fast host: the minimum sleep
