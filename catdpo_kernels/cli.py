"""Compatibility path for ``catdpo-train``: ``python -m catdpo_kernels.cli train ...`` keeps working.

The command line lives in :mod:`catdpo_kernels.training.cli` (``python -m catdpo_kernels.training``).
"""

import sys

from .training.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
