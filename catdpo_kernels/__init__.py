"""catdpo_kernels: fused Triton/CUDA kernels for Cat-DPO (category-adaptive safety DPO)."""

from .categories import PKU_SAFERLHF_CATEGORIES
from .constants import BACKENDS, LOSS_TYPES, REDUCTIONS, STAT_COLUMNS
from .loss import CatDPOLoss, LossOutput, loss
from .margins import CategoryMargins

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LOSS_TYPES",
    "PKU_SAFERLHF_CATEGORIES",
    "REDUCTIONS",
    "STAT_COLUMNS",
    "CatDPOLoss",
    "CategoryMargins",
    "LossOutput",
    "loss",
]
