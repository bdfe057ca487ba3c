"""Benchmarks: one harness (``harness.py``), one module per op, run with ``triton-dist bench NAME``."""
