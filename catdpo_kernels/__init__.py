"""catdpo_kernels: fused Triton/CUDA kernels for Cat-DPO (category-adaptive safety DPO).

The public names are imported on first use, so that ``import catdpo_kernels``
(and ``catdpo-train --help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "loss": "functional",
    "linear_loss": "functional",
    "HeadMetrics": "head",
    "CatDPOLinearLoss": "modules",
    "LossOutput": "functional",
    "CatDPOLoss": "modules",
    "CategoryMargins": "margins",
    "CategoryStats": "stats",
    "LossOptions": "options",
    "PKU_SAFERLHF_CATEGORIES": "categories",
    "BACKENDS": "constants",
    "LOSS_TYPES": "constants",
    "REDUCTIONS": "constants",
    "STAT_COLUMNS": "constants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'catdpo_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real names
    from .categories import PKU_SAFERLHF_CATEGORIES
    from .constants import BACKENDS, LOSS_TYPES, REDUCTIONS, STAT_COLUMNS
    from .functional import LossOutput, linear_loss, loss
    from .head import HeadMetrics
    from .margins import CategoryMargins
    from .modules import CatDPOLinearLoss, CatDPOLoss
    from .options import LossOptions
    from .stats import CategoryStats
