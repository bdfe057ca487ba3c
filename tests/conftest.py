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


def _world(n):
    gpus_or_skip(n)
    w = ProcessWorld(n, backend=BACKEND)
    w.start()
    yield w
    w.close()


@pytest.fixture(scope="session")
def world2():
    yield from _world(2)


@pytest.fixture(scope="session")
def world3():
    yield from _world(3)


@pytest.fixture(scope="session")
def world4():
    yield from _world(4)


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}ranks")
def world(request):
    """Each test that takes ``world`` runs on 2 and 4 ranks."""
    return request.getfixturevalue(f"world{request.param}")


@pytest.fixture
def seed(request):
    """A per-test seed, different for every test and parameter set, passed to the ranks."""
    import zlib
    return zlib.crc32(request.node.nodeid.encode())
