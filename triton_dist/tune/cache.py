"""The tuning cache: one JSON file of chosen configs, shared by every process of a user.

Where (first that applies): ``$TRITON_DIST_CACHE_DIR/tune.json``, ``$XDG_CACHE_HOME/triton_dist/tune.json``,
``~/.cache/triton_dist/tune.json``. Read when a shape is first met; written (by local rank 0 only) after a tuning.

Format::

    {"format": 1,
     "entries": {"<entry id>": {"kernel": "decode_gemm", "key": ["bf16", 16, 4096, 12288], "gpu": "NVIDIA H200",
                                "sms": 132, "world_size": 1, "torch": "2.11.0+cu130", "triton": "3.6.0",
                                "triton_dist": "0.1.0", "version": "", "config": {...}, "us": 38.1,
                                "candidates": 12, "failed": 0, "date": "2026-12-02"}}}

The entry id is the JSON list ``[kernel, key, gpu, sms, world_size, torch, triton, triton_dist, version]``: a change
of any of them (another card, fewer SMs, a new Triton, a kernel's new ``version``) misses and tunes again. Old
entries stay in the file; delete it to start over. A file that is corrupt, of another format or unreadable is
ignored with one warning (and replaced at the next write).

Writes take an advisory lock (``tune.json.lock``, where ``fcntl`` exists), merge with what is on disk (other
processes may have added entries), write a temporary file in the same directory and ``os.replace`` it: readers see
the old file or the new one, never half of one. A write that fails (read-only directory, full disk) warns once; the
choice then lasts for this process only.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

FORMAT = 1
FILE_NAME = "tune.json"
CACHE_DIR_ENV = "TRITON_DIST_CACHE_DIR"

_warned: set[str] = set()  # paths already warned about (one warning per file and problem)
_parsed: tuple | None = None  # (path, (mtime_ns, size, inode), entries) of the last file read


def cache_path() -> Path:
    """The cache file in use now (read from the environment at each call)."""
    d = os.environ.get(CACHE_DIR_ENV)
    if d:
        return Path(d).expanduser() / FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "triton_dist" / FILE_NAME


def _warn_once(tag: str, msg: str) -> None:
    if tag in _warned:
        return
    _warned.add(tag)
    warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the caller of tune.choose


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def versions() -> dict:
    """The software versions an entry is tied to."""
    import triton

    import triton_dist
    return {"torch": torch.__version__, "triton": triton.__version__, "triton_dist": triton_dist.__version__}


def hardware(world) -> tuple[str, int]:
    """``(GPU name, SMs the kernel may use)`` of ``world``'s device: ``("cpu", 1)`` in the CPU world."""
    if world.device.type == "cuda":
        return torch.cuda.get_device_name(world.device), int(world.num_sms)
    return "cpu", int(world.num_sms)


def entry_id(kernel: str, key, gpu: str, sms: int, world_size: int, vers: dict, version: str) -> str:
    return json.dumps([kernel, key, gpu, sms, world_size, vers["torch"], vers["triton"], vers["triton_dist"],
                       version], separators=(",", ":"), sort_keys=True)


def _read(path: Path) -> dict:
    """The entries of the file at ``path`` ({} if there is none); raises OSError or ValueError if it is unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise ValueError(f"not a triton-dist tune cache of format {FORMAT}")
    return data["entries"]


def load(path: Path) -> dict:
    """The entries of the cache file: {} when it is missing, and when it is corrupt or unreadable (one warning)."""
    global _parsed
    try:
        st = path.stat()
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if _parsed is not None and _parsed[0] == str(path) and _parsed[1] == sig:
            return _parsed[2]
        entries = _read(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _warn_once(f"read:{path}", f"triton-dist tune: ignoring the cache file {path} ({_first_line(e)}); shapes are "
                                   "tuned again and the file is replaced at the next write")
        return {}
    _parsed = (str(path), sig, entries)
    return entries


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the atomic replace still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def store(path: Path, eid: str, record: dict) -> None:
    """Add one entry to the file: lock, merge with what is on disk, write a temporary file, ``os.replace``. Never
    raises for a file-system error: it warns once instead."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            try:
                entries = dict(_read(path))
            except (OSError, ValueError):
                entries = {}  # corrupt: replaced (load() warned when it met it)
            entries[eid] = record
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                    f.write("\n")
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        _warn_once(f"write:{path}", f"triton-dist tune: could not write the cache file {path} ({_first_line(e)}); "
                                    "tuned choices last for this process only")


def record(kernel: str, key, gpu: str, sms: int, world_size: int, vers: dict, version: str, config: dict,
           us: float, candidates: int, failed: int) -> dict:
    return dict(kernel=kernel, key=key, gpu=gpu, sms=sms, world_size=world_size, version=version, config=config,
                us=round(us, 3), candidates=candidates, failed=failed, date=datetime.date.today().isoformat(), **vers)


def _reset() -> None:
    global _parsed
    _warned.clear()
    _parsed = None
