"""Test set-up: the CPU world runs kernels under Triton's interpreter, which must be chosen before triton
is imported anywhere; one session-scoped world per rank count."""
import os

import pytest

if os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DIST_WAIT_TIMEOUT_S", "30")

from triton_dist.testing import ProcessWorld  # noqa: E402  (after TRITON_INTERPRET)

BACKEND = os.environ.get("TRITON_DIST_TEST_BACKEND", "cpu")


def gpus_or_skip(n):
    """On GPUs, a world of n ranks needs n GPUs: skip (with the reason) on a smaller machine."""
    if BACKEND != "cpu":
        import torch
        have = torch.cuda.device_count()
        if have < n:
            pytest.skip(f"needs {n} GPUs, this machine has {have}")


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
    gpus_or_skip(n)
    key = (n, backend)
    if key not in cache:
        cache[key] = ProcessWorld(n, backend=backend)
        cache[key].start()
    return cache[key]


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
