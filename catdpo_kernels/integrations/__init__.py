"""Integrations with training frameworks (optional dependencies, imported lazily).

* :mod:`catdpo_kernels.integrations.trl`: ``CatDPOTrainer``, a ``trl.DPOTrainer``
  (TRL 1.x) whose loss is ``catdpo_kernels.loss``; ``pip install "catdpo_kernels[trl]"``.
"""

__all__ = ["trl"]
