"""``python -m catdpo_kernels.bench``: see ``catdpo_kernels.bench.cli``."""

from .cli import main

raise SystemExit(main())
