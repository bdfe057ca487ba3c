"""Helpers shared by tests; these functions run inside rank processes."""
import torch

import triton_dist


def this_world():
    return triton_dist.current_world()


def rand(shape, dtype, seed, device):
    """Fresh random data of any dtype (never zeros), the same on every rank for a given seed."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float32) + 0.5
    else:
        hi = 100 if dtype in (torch.int8, torch.uint8) else 1 << 20
        t = torch.randint(1, hi, shape, generator=g, dtype=torch.int64)
    return t.to(dtype).to(device)


def poison(t):
    """Fill with a value no kernel writes: NaN for floats, -7 for integers."""
    t.fill_(float("nan") if t.dtype.is_floating_point else -7)
    return t


def sync():
    triton_dist.synchronize()
