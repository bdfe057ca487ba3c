"""Shape buckets for tuning keys: one tuned config serves every size of a bucket."""
from __future__ import annotations


def _check_int(name: str, v, least: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        raise ValueError(f"{name} must be an int >= {least}, got {v!r}")


def bucket_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two ``>= n``, clamped to ``[lo, hi]``.

    ``bucket_pow2(5) == 8``, ``bucket_pow2(1) == 1``, ``bucket_pow2(3, lo=16) == 16``,
    ``bucket_pow2(1000, hi=256) == 256`` (``hi`` is then the bucket of every larger ``n``). ``n`` may be 0."""
    _check_int("n", n, 0)
    _check_int("lo", lo, 1)
    if hi is not None:
        _check_int("hi", hi, lo)
    p = 1 << max(0, n - 1).bit_length()
    p = max(p, lo)
    return p if hi is None else min(p, hi)


def bucket(n: int, edges) -> int:
    """The first of the ascending ``edges`` that is ``>= n``; the last edge when ``n`` is larger than all of them.

    ``bucket(20, (16, 64, 256)) == 64`` (the bucket ``16 < n <= 64``), ``bucket(300, (16, 64, 256)) == 256`` (the
    last bucket is open: every ``n > 64``)."""
    _check_int("n", n, 0)
    edges = tuple(edges)
    if not edges or any(not isinstance(e, int) or isinstance(e, bool) for e in edges) \
            or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be a non-empty, strictly ascending sequence of ints, got {edges!r}")
    for e in edges:
        if n <= e:
            return e
    return edges[-1]
