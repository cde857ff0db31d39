"""Per-pair terms for ``backend="torch"``: margin gather, ``ℓ`` and the stats rows.

Everything here is O(B), so the fused torch path reuses the reference's pair
math (autograd carries ``∂ℓ/∂π`` back to the sequence log-probs); only the
O(2B·T·V) sequence part needs a custom implementation.
"""

from __future__ import annotations

import torch

from .. import reference


def pair_terms_torch(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    categories: torch.Tensor | None,
    unsafe: torch.Tensor | None,
    margins: torch.Tensor | None,
    *,
    num_categories: int,
    margin: float,
    beta: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss (B,), stat rows (B, K) fp32)``."""
    num_pairs = policy_logps.shape[0] // 2
    device, dtype = policy_logps.device, policy_logps.dtype
    delta = reference.pair_margins(loss_type, num_pairs, categories, margins, margin, device, dtype)
    safety = reference.pair_safety(categories, unsafe, num_pairs, device)
    invalid = reference.invalid_categories(categories, num_categories)
    loss, h, z = reference.pair_loss(
        policy_logps, ref_logps, safety, delta, beta=beta, loss_type=loss_type, invalid=invalid
    )
    return loss, reference.pair_stat_values(loss, h, z, beta)
