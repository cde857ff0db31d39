"""The ``(C+1, K)`` per-category statistics table and the ``category_mean`` reduction."""

from __future__ import annotations

import torch

from .segment_reduce import segment_reduce


def category_table(values: torch.Tensor, categories: torch.Tensor | None, num_categories: int) -> torch.Tensor:
    """Segment-sum per-pair stat rows ``(B, K)`` into the ``(C+1, K)`` fp32 table."""
    if categories is None:
        categories = torch.full((values.shape[0],), -1, device=values.device, dtype=torch.int64)
    return segment_reduce(values.detach().float(), categories, num_categories)


def category_mean_weights(counts: torch.Tensor, categories: torch.Tensor | None, num_pairs: int) -> torch.Tensor:
    """Per-pair weights ``w`` with ``Σ w·ℓ`` equal to the mean over active rows of each row's mean loss.

    A pair in rows ``R`` gets ``Σ_{r∈R} 1/count_r / n_active``. ``counts`` is
    column 0 of the table; nothing here synchronises with the host.
    """
    counts = counts.double()  # exact 1/count for float64 losses; O(C) work
    num_rows = counts.shape[0]
    active = counts > 0
    inv = torch.where(active, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    inv = inv / active.sum().clamp(min=1)
    if categories is None:
        return inv[num_rows - 1].expand(num_pairs)
    if categories.dim() == 2:
        none = ~categories.any(-1)
        return categories.to(inv.dtype) @ inv[: num_rows - 1] + none.to(inv.dtype) * inv[num_rows - 1]
    idx = torch.where(categories < 0, torch.full_like(categories, num_rows - 1), categories)
    padded = torch.cat([inv, inv.new_full((1,), float("nan"))])
    # Out-of-range ids (checks off) get a NaN weight: the category_mean is NaN for
    # every loss type, never a silent average without them.
    idx = torch.where((categories < -1) | (categories >= num_rows - 1), torch.full_like(idx, num_rows), idx)
    return padded[idx]
