"""Compatibility path: ``from catdpo_kernels.train import TrainConfig, train, compare, main`` keeps working.

The training program lives in :mod:`catdpo_kernels.training`.
"""

from .training import TrainConfig, compare, main, train

__all__ = ["TrainConfig", "compare", "main", "train"]
