"""Test set-up: the CPU world runs kernels under Triton's interpreter, which must be chosen before triton
is imported anywhere; one session-scoped world per rank count."""
import os

import pytest

if os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DIST_WAIT_TIMEOUT_S", "30")

from triton_dist.testing import ProcessWorld  # noqa: E402  (after TRITON_INTERPRET)

BACKEND = os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu")
# On a machine with fewer GPUs than a world size, TRITON_DIST_TEST_SHARE_GPUS=1 runs that world with ranks sharing
# GPUs (scripts/gpu_suite.sh sets it there); without it such a world is skipped.
SHARE_GPUS = BACKEND != "cpu" and os.environ.get("TRITON_DIST_TEST_SHARE_GPUS", "0") == "1"


def world_options(n, backend=BACKEND):
    """ProcessWorld keyword arguments of an n-rank world here: one GPU per rank where there are enough, a shared-GPU
    world where not (with TRITON_DIST_TEST_SHARE_GPUS=1); otherwise the test is skipped, with the reason."""
    if backend == "cpu":
        return dict(backend="cpu")
    import torch
    have = torch.cuda.device_count()
    if have >= n:
        return dict(backend=backend)
    if backend == "nvshmem":
        pytest.skip(f"backend nvshmem needs one GPU per rank: {n} ranks, this machine has {have} GPU(s)")
    if not SHARE_GPUS:
        pytest.skip(f"needs {n} GPUs, this machine has {have} (TRITON_DIST_TEST_SHARE_GPUS=1 shares them)")
    return dict(backend=backend, share_gpus=True)


def new_world(n, backend=BACKEND, **kwargs):
    """A fresh ProcessWorld of n ranks on this machine (see world_options), for tests that need their own."""
    return ProcessWorld(n, **world_options(n, backend), **kwargs)


# World sizes of the `world` fixture: "2,4" by default; e.g. TRITON_DIST_TEST_WORLD_SIZES=8 on an 8-GPU machine.
WORLD_SIZES = [int(n) for n in os.environ.get("TRITON_DIST_TEST_WORLD_SIZES", "2,4").split(",") if n.strip()]


@pytest.fixture(scope="session")
def worlds():
    """Session cache of worlds by size, started on first use and closed at the end."""
    cache = {}
    yield cache
    for w in cache.values():
        w.close()


def get_world(cache, n, backend=BACKEND):
    key = (n, backend)
    if key not in cache:
        cache[key] = new_world(n, backend)
        cache[key].start()
    return cache[key]


@pytest.fixture(scope="session")
def world1(worlds):
    return get_world(worlds, 1)


@pytest.fixture(scope="session")
def world2(worlds):
    return get_world(worlds, 2)


@pytest.fixture(scope="session")
def world3(worlds):
    return get_world(worlds, 3)


@pytest.fixture(params=WORLD_SIZES, ids=lambda n: f"{n}ranks")
def world(request, worlds):
    """Each test that takes ``world`` runs on every size of TRITON_DIST_TEST_WORLD_SIZES (default 2 and 4)."""
    return get_world(worlds, request.param)


@pytest.fixture
def seed(request):
    """A per-test seed, different for every test and parameter set, passed to the ranks."""
    import zlib
    return zlib.crc32(request.node.nodeid.encode())
