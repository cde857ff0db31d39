"""``python -m catdpo_kernels.training`` / ``torchrun -m catdpo_kernels.training``: ``catdpo-train``."""

import sys

from .cli import main

sys.exit(main())
