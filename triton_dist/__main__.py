"""``python -m triton_dist ...``: the ``triton-dist`` command; see :mod:`triton_dist.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
