"""The ``(C+1, K)`` per-category statistics table and the ``category_mean`` reduction weights."""

from __future__ import annotations

import torch

from ..categories import CategoryAssignment
from .segment_reduce import segment_reduce


def category_table(values: torch.Tensor, assignment: CategoryAssignment) -> torch.Tensor:
    """Segment-sum per-pair stat rows ``(B, K)`` into the ``(C+1, K)`` fp32 table."""
    ids, num_segments = assignment.segment_ids()
    return segment_reduce(values.detach().float(), ids, num_segments)[:num_segments]


def category_mean_weights(counts: torch.Tensor, assignment: CategoryAssignment) -> torch.Tensor:
    """Per-pair weights ``w`` with ``Σ w·ℓ`` equal to the mean over active rows of each row's mean loss.

    A pair in rows ``R`` gets ``Σ_{r∈R} 1/count_r / n_active``; an invalid pair a
    NaN weight, so the reduction is NaN rather than an average without it.
    ``counts`` is column 0 of the table; nothing here synchronises with the host.
    """
    counts = counts.double()  # exact 1/count for float64 losses; O(C) work
    active = counts > 0
    inv = torch.where(active, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return assignment.gather(inv / active.sum().clamp(min=1))
