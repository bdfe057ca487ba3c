"""argparse value types shared by the commands (``triton-dist generate``, the benchmarks)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1, or an ``argparse`` error naming what was expected."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v
