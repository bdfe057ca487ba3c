"""``choose``: the config of a kernel for a shape, measured once per world and cached (see the package docstring)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref
import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from ..runtime import world as _rw
from ..runtime.errors import CallMismatch
from . import cache

AUTOTUNE_ENV = "TRITON_DIST_AUTOTUNE"
SLEEP_CYCLES = 1_000_000  # at least this GPU sleep is queued before the timed runs, so the host enqueues them ahead
GPU_CLOCK_HZ = 2.0e9  # torch.cuda._sleep counts SM cycles (H100/H200: up to ~1.98 GHz): seconds -> cycles
MAX_SLEEP_S = 0.25  # the sleep covers the host's enqueue time of every timed run, up to this


class TuneError(RuntimeError):
    """Every candidate config of a kernel failed on some rank; the message names each config's first error line."""


_MISS = object()
_memo: dict = {}  # (kernel, key, version, tuning?) -> the chosen candidate object
_memo_world = None  # a weak reference to the world _memo belongs to (a new world starts a new memo); weak, so that a
# finalized world (its process group and store) is freed then, not at interpreter exit (where freeing a store's
# threads aborted the process: "terminate called without an active exception", seen in the CPU world)
_capture_warned: set = set()


def _mode() -> bool:
    """True when ``TRITON_DIST_AUTOTUNE`` allows tuning (``1``, the default), False for ``0``."""
    v = os.environ.get(AUTOTUNE_ENV, "").strip()
    if v in ("", "1"):
        return True
    if v == "0":
        return False
    raise ValueError(f"{AUTOTUNE_ENV} must be 0 (fixed default configs) or 1 (tune on GPUs, the default), got {v!r}")


_LOCAL = {"depth": 0}


class _LocalView:
    """This rank of ``world`` seen as a world of one: its device and SMs, no process group."""

    world_size, rank, local_rank, group, host_backend = 1, 0, 0, None, "gloo"

    def __init__(self, world):
        self.base, self.device, self.interpreted = world, world.device, world.interpreted
        self.num_sms = world.num_sms


_local_views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def local():
    """Inside, :func:`choose` tunes on this rank alone (its own timings, no collective): for kernels that only this
    rank runs, e.g. a pipeline stage's layers at TP=1 while the other stages run theirs (a collective tuning step
    there would wait for ranks that never call it). Choices are memoised per (world, local or not)."""
    _LOCAL["depth"] += 1
    try:
        yield
    finally:
        _LOCAL["depth"] -= 1


def _current_world():
    world = _rw.current_world() if _rw.is_initialized() else None
    if world is None or not _LOCAL["depth"] or world.world_size == 1:
        return world
    try:
        view = _local_views.get(world)
        if view is None:
            view = _local_views[world] = _LocalView(world)
    except TypeError:  # a world that takes no weak reference
        view = _LocalView(world)
    return view


def enabled(world=None, *, force: bool = False) -> bool:
    """Whether :func:`choose` measures in ``world`` (default: the current world): ``TRITON_DIST_AUTOTUNE`` is not
    ``0``, there is a world, and it is a GPU world (or ``force``). Raises ValueError for a bad
    ``TRITON_DIST_AUTOTUNE``."""
    on = _mode()
    world = world if world is not None else _current_world()
    return on and world is not None and (force or not world.interpreted)


def _memo_key(kernel: str, key, version: str, tuning: bool):
    if isinstance(key, tuple):
        k = key
    elif isinstance(key, list):
        k = tuple(key)
    elif isinstance(key, Mapping):
        try:
            k = (dict, tuple(sorted(key.items())))
        except TypeError:
            raise ValueError(f"tune.choose({kernel!r}): a dict key needs str names, got {key!r}") from None
    else:
        raise ValueError(f"tune.choose({kernel!r}): key must be a tuple or dict of shape-bucket values, e.g. "
                         f"('bf16', bucket_pow2(m), n, k), got {type(key).__name__} {key!r}")
    return (kernel, k, version, tuning)


def _canon(cfg, what: str):
    """``cfg`` as JSON data (what the cache stores), checking that it round-trips."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        d = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        d = dict(cfg)
    else:
        raise ValueError(f"{what} must be a dataclass instance or a dict, got {type(cfg).__name__} {cfg!r}")
    try:
        return json.loads(json.dumps(d, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} {cfg!r} must round-trip through JSON (str, int, float, bool, None, lists and "
                         f"dicts of them): {e}") from None


class _Call:
    """One validated ``choose`` call."""

    def __init__(self, kernel, key, configs, default, bench, version, warmup, iters, timer):
        where = f"tune.choose({kernel!r})"
        if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence):
            raise ValueError(f"{where}: configs must be a sequence of candidate configs, got {type(configs).__name__}")
        if not callable(bench):
            raise ValueError(f"{where}: bench must be callable as bench(config), got {type(bench).__name__}")
        if timer is not None and not callable(timer):
            raise ValueError(f"{where}: timer must be callable as timer(config, run) -> microseconds, got "
                             f"{type(timer).__name__}")
        for name, v, least in (("warmup", warmup, 0), ("iters", iters, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{where}: {name} must be an int >= {least}, got {v!r}")
        try:
            self.key_json = json.loads(json.dumps(key, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: key {key!r} must be JSON data (str, int, float, bool, None; e.g. str(dtype) "
                             f"for a torch dtype): {e}") from None
        self.canon = [_canon(c, f"{where}: configs[{i}]") for i, c in enumerate(configs)]
        _canon(default, f"{where}: default")
        self.kernel, self.key, self.configs, self.default, self.bench = kernel, key, tuple(configs), default, bench
        self.version, self.warmup, self.iters, self.timer = version, warmup, iters, timer
        items = key.items() if isinstance(key, Mapping) else ((None, v) for v in key)
        self.label = f"{kernel} ({', '.join(str(v) if k is None else f'{k}={v}' for k, v in items)})"
        sig = json.dumps([kernel, self.key_json, version, self.canon], sort_keys=True)
        self.signature = zlib.crc32(sig.encode())  # the same on every rank that makes the same call

    def index_of(self, stored) -> int:
        """Index of the candidate equal to a stored config, or -1."""
        for i, c in enumerate(self.canon):
            if c == stored:
                return i
        return -1


def choose(kernel: str, key, configs, default, bench, *, world=None, version: str = "", warmup: int = 3,
           iters: int = 20, timer=None, force: bool = False):
    """The fastest of ``configs`` for ``kernel`` at shape bucket ``key``, the same on every rank of ``world``.

    Args:
        kernel: the kernel's name, e.g. ``"decode_gemm"``.
        key: a tuple (or dict) of JSON values naming the shape bucket, e.g. ``("bf16", bucket_pow2(m), n, k)``;
            every rank must pass the same key.
        configs: the candidates: frozen dataclass instances or dicts that round-trip through JSON. Empty: the
            default is the only choice (returned without measuring). Or a callable returning them, called only
            when the key is not memoised yet (so a kernel calling ``choose`` at every launch builds no list then).
        default: what is returned without tuning (``TRITON_DIST_AUTOTUNE=0``, the CPU world, no world, during
            CUDA-graph capture); it need not be one of ``configs``. May be a callable too, like ``configs``.
        bench: ``bench(config)`` runs the kernel once with ``config`` on representative inputs. An exception
            (compile error, out of resources) rules that config out on every rank.
        world: the world (default: the current one; without ``triton_dist.init()`` there is none: ``default``).
        version: the kernel's own version string; change it when the kernel changes, so old cache entries miss.
        warmup, iters: runs before timing, and timed runs whose median is this rank's time of a config.
        timer: ``timer(config, run) -> microseconds`` replaces the default timing (CUDA events on GPUs, the host
            clock otherwise); ``run()`` runs the kernel once. For tests.
        force: measure in the CPU world too (a test hook; ``TRITON_DIST_AUTOTUNE=0`` still wins).

    A config's time is the **maximum over ranks** of each rank's median, and the smallest such time wins (ties: the
    earlier candidate), so every rank picks the same config. The choice is memoised in the process (later calls
    with the same kernel, key and version are a dict lookup: no collective, no file access) and stored in the cache
    file (:func:`cache_path`); a later process whose ranks all find the same entry there uses it without measuring.

    Collective at the first call of a key in a tuning world: every rank must make it, in the same order (a rank
    with another kernel, key or candidate list raises :class:`~triton_dist.CallMismatch` on every rank).
    Tuning runs kernels: make the first call of each shape before CUDA-graph capture. A call during capture that
    would need tuning returns ``default`` (one warning per key) and is not memoised.

    Raises :class:`TuneError` when every config failed, ValueError for bad arguments or a bad
    ``TRITON_DIST_AUTOTUNE``.
    """
    global _memo_world
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"tune.choose: kernel must be a non-empty str naming the kernel, got {kernel!r}")
    if not isinstance(version, str):
        raise ValueError(f"tune.choose({kernel!r}): version must be a str, got {type(version).__name__}")
    world = world if world is not None else _current_world()
    tuning = _mode() and world is not None and (force or not world.interpreted)
    base = getattr(world, "base", world)  # a local view shares its world's memo
    if (_memo_world() if _memo_world is not None else None) is not base:
        _memo.clear()
        _memo_world = _weak(base) if base is not None else None
    mkey = _memo_key(kernel, key, version, tuning) + (isinstance(world, _LocalView),)
    try:
        hit = _memo.get(mkey, _MISS)
    except TypeError:
        raise ValueError(f"tune.choose({kernel!r}): key values must be hashable (str, int, float, bool, None), got "
                         f"{key!r}") from None
    if hit is not _MISS:
        return hit
    if callable(configs):  # built only on a miss: a kernel's per-call cost stays the memo lookup
        configs = configs()
    if callable(default):
        default = default()
    call = _Call(kernel, key, configs, default, bench, version, warmup, iters, timer)
    if not tuning or not call.configs:  # nothing to measure, or nothing to choose from
        _memo[mkey] = default
        return default
    if _capturing():
        if mkey not in _capture_warned:
            _capture_warned.add(mkey)
            warnings.warn(f"triton-dist tune: the first call of {call.label} in this process is during CUDA-graph "
                          "capture, where nothing can be measured: its default config is used (and captured). Call "
                          "the op once for each shape before capturing.", RuntimeWarning, stacklevel=2)
        return default
    chosen = _tune(call, world)
    _memo[mkey] = chosen
    return chosen


def _weak(world):
    """A weak reference to ``world`` (a strong one for objects that take none, e.g. the tests' stand-in worlds)."""
    try:
        return weakref.ref(world)
    except TypeError:
        return lambda: world


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError, AttributeError):  # a torch without CUDA
        return False


def _all_max(world, values: list[float]) -> list[float]:
    """Element-wise maximum over the ranks (one all_reduce): a CPU tensor on gloo groups, else a CUDA one."""
    if world.world_size == 1:
        return [float(v) for v in values]
    host = "gloo" in str(getattr(world, "host_backend", "gloo"))
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if host else world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.group)
    return t.tolist()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _tune(call: _Call, world):
    gpu, sms = cache.hardware(world)
    vers = cache.versions()
    eid = cache.entry_id(call.kernel, call.key_json, gpu, sms, world.world_size, vers, call.version)
    path = cache.cache_path()
    stored = cache.load(path).get(eid)
    idx = call.index_of(stored.get("config")) if isinstance(stored, dict) else -1
    # One all_reduce: do all ranks make this call, and do they all hold the same cached choice?
    hi_idx, neg_lo_idx, hi_sig, neg_lo_sig = _all_max(world, [idx, -idx, call.signature, -call.signature])
    if hi_sig != -neg_lo_sig:
        raise CallMismatch(f"rank {world.rank}: tune.choose({call.label}): the ranks asked for different kernels, keys "
                           f"or candidate lists (every rank must call choose with the same arguments, in the same "
                           f"order; a key must not depend on the rank)")
    if idx >= 0 and hi_idx == -neg_lo_idx:
        return call.configs[idx]
    progress = _Progress(call.label, len(call.configs), world.rank == 0)
    times, errors = _measure(call, world, progress)
    best = min(range(len(times)), key=lambda i: (times[i], i))
    failed = sum(math.isinf(t) for t in times)
    if math.isinf(times[best]):
        progress.finish("every config failed")
        raise TuneError(_all_failed(call, world, errors))
    if getattr(world, "local_rank", world.rank) == 0:
        cache.store(path, eid, cache.record(call.kernel, call.key_json, gpu, sms, world.world_size, vers,
                                            call.version, call.canon[best], times[best], len(times), failed))
    more = f", {failed} failed" if failed else ""
    progress.finish(f"chose configs[{best}] of {len(times)}{more}: {call.configs[best]!r}, {times[best]:.1f} us "
                    f"(slowest rank); cached in {path}")
    return call.configs[best]


def _measure(call: _Call, world, progress: "_Progress") -> tuple[list[float], list[str | None]]:
    """Per config: one trial run (compiles; an error rules the config out), an all_reduce so that every rank learns
    whether any rank failed, then this rank's time; finally the slowest rank's times (one all_reduce)."""
    timer = call.timer or (lambda cfg, run: _time_runs(run, world, call.warmup, call.iters))
    times, errors = [], []
    for i, cfg in enumerate(call.configs):
        def run(cfg=cfg):
            call.bench(cfg)
        err, t = None, math.inf
        try:
            run()
            if world.device.type == "cuda":
                torch.cuda.synchronize(world.device)
        except Exception as e:  # noqa: BLE001  (the config is out, on every rank)
            err = _first_line(e)
        if _all_max(world, [0.0 if err is None else 1.0])[0] == 0.0:
            try:
                t = float(timer(cfg, run))
                if not (t >= 0.0 and math.isfinite(t)):
                    err, t = f"the timer returned {t!r}", math.inf
            except Exception as e:  # noqa: BLE001
                err, t = _first_line(e), math.inf
        times.append(t)
        errors.append(err)
        progress.update(i + 1, min(times), sum(math.isinf(x) for x in times))
    return _all_max(world, times), errors


def _time_runs(run, world, warmup: int, iters: int) -> float:
    """This rank's median microseconds of ``run()`` over ``iters`` runs after ``warmup``: CUDA events on GPUs (the
    runs queued behind a GPU sleep long enough for the host to enqueue all of them, so host launch time is not
    measured), the host clock otherwise."""
    for _ in range(warmup):
        run()
    if world.device.type != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    # The host's time to enqueue one run (checks, descriptors, launch: tens of us in Python, more than a decode-size
    # kernel takes): the sleep must outlast the enqueueing of all timed runs, or the events time the host instead
    # (seen on an H200: 76 us per run for a 19 us kernel, which made the choice among decode configs noise).
    torch.cuda.synchronize(world.device)
    t0 = time.perf_counter()
    run()
    run()
    host_s = (time.perf_counter() - t0) / 2
    torch.cuda.synchronize(world.device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(max(SLEEP_CYCLES, int(min(MAX_SLEEP_S, 1.5 * (iters + 1) * host_s) * GPU_CLOCK_HZ)))
    events[0].record()
    for e in events[1:]:
        run()
        e.record()
    events[-1].synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in zip(events, events[1:]))


def _all_failed(call: _Call, world, errors: list[str | None]) -> str:
    by_rank = [errors]
    if world.world_size > 1:
        by_rank = [None] * world.world_size
        dist.all_gather_object(by_rank, errors, group=world.group)
    lines = [f"tune.choose: every config of {call.label} failed (world of {world.world_size}):"]
    for i, cfg in enumerate(call.configs):
        seen: dict[str, list[int]] = {}
        for r, errs in enumerate(by_rank):
            if errs[i] is not None:
                seen.setdefault(errs[i], []).append(r)
        why = "; ".join(f"{_who(ranks, len(by_rank))}: {msg}" for msg, ranks in seen.items())
        lines.append(f"  configs[{i}] {cfg!r}: {why}")
    return "\n".join(lines)


def _who(ranks: list[int], world_size: int) -> str:
    if len(ranks) == world_size > 1:
        return "all ranks"
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


class _Progress:
    """Rank 0's progress on stderr: one line redrawn in place on a terminal; a first and a last line otherwise."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.head, self.total, self.enabled = f"triton-dist tune: {label}", total, enabled
        self.stream = sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0
        if enabled and not self.tty:
            self._write(f"{self.head}: timing {total} configs\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def update(self, done: int, best: float, failed: int) -> None:
        if not (self.enabled and self.tty):
            return
        more = f" ({failed} failed)" if failed else ""
        line = f"{self.head}: {done}/{self.total} configs{more}" + (
            f", best {best:.1f} us" if math.isfinite(best) else "")
        self._write("\r" + line.ljust(self._last))
        self._last = len(line)

    def finish(self, text: str) -> None:
        if self.enabled:
            line = f"{self.head}: {text}"
            self._write(("\r" + line.ljust(self._last) if self.tty else line) + "\n")


def _reset() -> None:
    """Forget memoised choices and warnings (tests; a process that changed its cache file)."""
    global _memo_world
    _memo.clear()
    _memo_world = None
    _capture_warned.clear()
