"""``LossOptions``: every scalar option of one loss call, checked once, frozen.

``loss()`` and ``linear_loss()`` build it from their keyword arguments; the
backends, the pair stage and the reduction read it and nothing else.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .constants import BACKENDS, REDUCTIONS
from .loss_types import LossType, loss_type

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class LossOptions:
    loss_type: str = "catdpo"
    beta: float = 0.1
    margin: float = 0.0
    """SafeDPO's single global ``Δ`` (``loss_type="safedpo"`` only)."""
    reduction: str = "mean"
    ignore_index: int = -100
    shift_labels: bool = False
    average_log_prob: bool = False
    inplace_backward: bool = False
    check_inputs: bool = True
    backend: str = "auto"

    def __post_init__(self):
        spec = loss_type(self.loss_type)  # raises on an unknown name
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
            raise TypeError(f"beta must be a float, got {type(self.beta).__name__}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, numbers.Real) or not math.isfinite(self.margin):
            raise ValueError(f"margin must be a finite float, got {self.margin!r}")
        if self.margin != 0 and spec.margin != "scalar":
            raise ValueError(
                f"margin={self.margin} is SafeDPO's single global margin and is read only by loss_type='safedpo'; "
                f"loss_type={self.loss_type!r} would ignore it"
                + (" (per-category margins go in margins=)" if spec.margin == "per_category" else "")
            )
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not INT64_MIN <= self.ignore_index <= INT64_MAX:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        for name in ("shift_labels", "average_log_prob", "inplace_backward", "check_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        # Plain Python scalars from here on (a 0-d tensor or numpy float would leak into kernels).
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "margin", float(self.margin))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))

    @property
    def spec(self) -> LossType:
        return loss_type(self.loss_type)

    def sequence_options(self) -> dict:
        """The options of the sequence stage (log-probs from logits or hidden states)."""
        return dict(
            ignore_index=self.ignore_index, average_log_prob=self.average_log_prob, shift_labels=self.shift_labels
        )
