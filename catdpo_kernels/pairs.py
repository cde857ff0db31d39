"""``PairInputs``: everything the pair stage needs besides the log-probs, built once per call.

``loss()`` and ``linear_loss()`` canonicalise ``categories``, ``margins`` and
``unsafe`` here; every backend's pair stage reads the result and only indexes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .categories import CategoryAssignment
from .loss_types import LossType


@dataclass(frozen=True)
class PairInputs:
    assignment: CategoryAssignment
    margin_table: torch.Tensor
    """``(C + 2,)`` ``Δ`` per stats row (``CategoryAssignment.margin_table``)."""
    signs: torch.Tensor
    """``(B,)`` fp32 ``s = h_l − h_w`` (NaN for invalid flags)."""

    @classmethod
    def build(
        cls,
        spec: LossType,
        categories: torch.Tensor | None,
        margins: torch.Tensor | None,
        margin: float,
        unsafe: torch.Tensor | None,
        *,
        num_categories: int,
        num_pairs: int,
        device: torch.device,
    ) -> PairInputs:
        assignment = CategoryAssignment.from_categories(categories, num_categories, num_pairs, device)
        table = assignment.margin_table(spec, margins, margin)
        return cls(assignment, table, pair_signs(unsafe, assignment))

    @property
    def num_pairs(self) -> int:
        return self.assignment.num_pairs

    def narrow(self, start: int, stop: int) -> PairInputs:
        """The pairs ``[start, stop)`` only (the fused head scores pairs in groups)."""
        a = self.assignment
        sub = CategoryAssignment(
            a.num_categories,
            stop - start,
            rows=None if a.rows is None else a.rows[start:stop],
            member=None if a.member is None else a.member[start:stop],
        )
        return PairInputs(sub, self.margin_table, self.signs[start:stop])


def pair_signs(unsafe: torch.Tensor | None, assignment: CategoryAssignment) -> torch.Tensor:
    """``s = h_l − h_w`` per pair as fp32, or ``1`` for pairs with a category when no flags are given.

    Anything but 0/1 flags with ``s ∈ {0, 1}`` gives NaN (reachable only with
    ``check_inputs=False``): a chosen-unsafe, rejected-safe pair (``s = −1``)
    would push the policy towards the unsafe response.
    """
    if unsafe is None:
        return assignment.has_category().float()
    u = unsafe.float()
    b = assignment.num_pairs
    s = u[b:] - u[:b]
    flags_ok = ((u == 0) | (u == 1)).view(2, b).all(0)
    return torch.where(flags_ok & (s >= 0), s, float("nan"))
