"""The world-aware autotuner: a kernel's config chosen by measurement, the same on every rank, cached on disk.

A kernel asks for its config at each call::

    from triton_dist import tune

    cfg = tune.choose("decode_gemm", (str(a.dtype), tune.bucket_pow2(m, hi=256), n, k),
                      candidate_configs(m, n, k, a.dtype, sms), default_config(m, n, k, a.dtype, sms),
                      lambda c: _launch(a, b, out, c), version="2")

* First call of a key in a GPU world: every rank runs each candidate (one trial run, then ``warmup`` runs and the
  median of ``iters`` runs timed with CUDA events); a config's time is the slowest rank's; the fastest config wins
  on every rank; a config that raised on any rank is out on all of them. Rank 0 prints a progress line on stderr.
* The choice goes to a JSON file (:func:`cache_path`), keyed by kernel, key, GPU name, SMs the rank may use, world
  size and the torch / triton / triton_dist / kernel versions. A later process whose ranks all find the same entry
  uses it without measuring (one small all_reduce checks that they agree).
* Later calls in the process: a dict lookup (no collective, no file access), so ops stay CUDA-graph capturable after
  their first call per shape. A call during capture that would need tuning returns ``default`` with a warning.
* ``TRITON_DIST_AUTOTUNE=0``, the CPU world and a process without ``triton_dist.init()``: ``default``, nothing
  measured, no collective.
* ``with tune.local():``: this rank tunes alone (its own timings, no collective), for kernels the other ranks do not
  run at the same time (a pipeline stage's own layers).

Test hook: ``choose(..., force=True, timer=...)`` runs the measuring path in the CPU world with injected times;
``tune._reset()`` forgets the memo and the one-time warnings. See ``docs/tune.md``.
"""
from .buckets import bucket, bucket_pow2
from .cache import CACHE_DIR_ENV, cache_path
from .tuner import AUTOTUNE_ENV, TuneError, choose, enabled, local


def _reset() -> None:
    """Forget every memoised choice, the parsed cache file and the one-time warnings (for tests)."""
    from . import cache, tuner
    tuner._reset()
    cache._reset()


__all__ = ["choose", "enabled", "local", "bucket_pow2", "bucket", "cache_path", "TuneError", "AUTOTUNE_ENV",
           "CACHE_DIR_ENV"]
