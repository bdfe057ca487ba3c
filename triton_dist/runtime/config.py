"""Environment knobs of triton-dist, read in one place.

Every knob is read when ``triton_dist.init()`` runs, never at import time.

=============================  ======================================================
variable                       meaning
=============================  ======================================================
``TRITON_DIST_BACKEND``        ``auto`` (default), ``cuda``, ``nvshmem`` or ``cpu``
``TRITON_DIST_HEAP_SIZE``      symmetric heap bytes per rank, e.g. ``512M``, ``4G``
``TRITON_DIST_DEBUG``          ``1``: check that every rank allocates the same sequence
``TRITON_DIST_WAIT_TIMEOUT_S`` seconds a device-side wait spins before it fails
``TRITON_DIST_RUN_ID``         names the CPU world's shared-memory segments (launcher)
``TRITON_DIST_SHARE_GPUS``     ``1``: ranks may share GPUs (rank ``r`` on GPU ``local_rank % G``;
                               ``triton-dist run --share-gpus`` sets it)
=============================  ======================================================
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

BACKENDS = ("auto", "cuda", "nvshmem", "cpu")
DEFAULT_HEAP_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30, "nvshmem": 1 << 30}
DEFAULT_WAIT_TIMEOUT_S = 60.0
SHARE_GPUS_ENV = "TRITON_DIST_SHARE_GPUS"
# Variables that keep NVLink multicast off; the launcher forces them on GPU machines.
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$")


def parse_size(text: str) -> int:
    """Parse ``"512M"``, ``"4G"``, ``"65536"`` into bytes (K/M/G are powers of 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"TRITON_DIST_HEAP_SIZE: expected a byte count like 65536, 512M or 4G, got {text!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * mult


@dataclass(frozen=True)
class Config:
    backend: str
    heap_bytes: int | None
    debug: bool
    wait_timeout_s: float

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.heap_bytes is not None and self.heap_bytes <= 0:
            raise ValueError(f"heap size must be positive, got {self.heap_bytes}")
        if not self.wait_timeout_s > 0:
            raise ValueError(f"TRITON_DIST_WAIT_TIMEOUT_S must be positive, got {self.wait_timeout_s}")

    @staticmethod
    def from_env(backend: str | None = None, heap_bytes: int | None = None) -> "Config":
        env = os.environ
        if backend is None or backend == "auto":
            backend = env.get("TRITON_DIST_BACKEND", backend or "auto").strip().lower()
        if heap_bytes is None and env.get("TRITON_DIST_HEAP_SIZE"):
            heap_bytes = parse_size(env["TRITON_DIST_HEAP_SIZE"])
        timeout = env.get("TRITON_DIST_WAIT_TIMEOUT_S", str(DEFAULT_WAIT_TIMEOUT_S))
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise ValueError(f"TRITON_DIST_WAIT_TIMEOUT_S: expected seconds, got {timeout!r}") from None
        return Config(backend=backend, heap_bytes=heap_bytes,
                      debug=env.get("TRITON_DIST_DEBUG", "0") not in ("", "0", "false", "False"),
                      wait_timeout_s=timeout_s)
