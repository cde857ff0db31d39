"""Segmented sums of per-pair rows into per-category rows.

``segment_reduce(values (N, K), segment_ids, num_segments) -> (num_segments + 1, K)``:
``segment_ids`` is ``(N,)`` int64 with ``-1`` for the extra "none" row, or an
``(N, num_segments)`` bool multi-hot matrix whose all-false rows go to the
"none" row. Ids outside ``[-1, num_segments)`` count nowhere.
"""

from __future__ import annotations

import torch


def segment_reduce_torch(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Pure-torch implementation with a fixed summation order (deterministic)."""
    values = values.float()
    out = values.new_zeros(num_segments + 1, values.shape[-1])
    if values.shape[0] == 0:
        return out
    if segment_ids.dim() == 2:
        member = torch.cat([segment_ids, ~segment_ids.any(-1, keepdim=True)], dim=1).to(torch.float64)
        return (member.T @ values.to(torch.float64)).float()
    ids = torch.where(segment_ids < 0, torch.full_like(segment_ids, num_segments), segment_ids)
    keep = (segment_ids >= -1) & (segment_ids < num_segments)
    onehot = torch.nn.functional.one_hot(ids.clamp(0, num_segments), num_segments + 1).to(torch.float64)
    onehot = onehot * keep.unsqueeze(-1).to(torch.float64)
    return (onehot.T @ values.to(torch.float64)).float()


def segment_reduce(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    return segment_reduce_torch(values, segment_ids, num_segments)
