"""Kernel library: one module per op, each with its context object, launcher and ``<op>_reference``."""
