"""Per-pair terms for ``backend="torch"``: margin gather, ``ℓ``, ``∂ℓ/∂h`` and the stats rows.

Everything here is O(B). Each family's loss and its derivative are written in
closed form (the Triton pair kernel computes the same two numbers), and one
small autograd Function carries ``∂ℓ/∂h`` back to the sequence log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pairs import PairInputs
from .first_order import first_order


def _sigmoid(h, z, beta):
    return -F.logsigmoid(z), -beta * torch.sigmoid(-z)


def _ipo(h, z, beta):
    d = h - 1.0 / (2.0 * beta)
    return d * d, 2.0 * d


# family -> (h, z, beta) -> (ℓ, ∂ℓ/∂h); see catdpo_kernels.loss_types.
FAMILY_FORMULAS = {"sigmoid": _sigmoid, "ipo": _ipo}


class _PairLoss(torch.autograd.Function):
    """``(2B,)`` policy log-probs -> ``(B,)`` loss, with ``∂h/∂π_w = 1`` and ``∂h/∂π_l = −1``."""

    @staticmethod
    def forward(ctx, policy_logps, loss, dldh):
        ctx.save_for_backward(dldh)
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        (dldh,) = ctx.saved_tensors
        g = grad_loss * dldh
        return torch.cat([g, -g]), None, None


def pair_terms_torch(policy_logps, ref_logps, pairs: PairInputs, *, beta: float, family: str):
    """Returns ``(loss (B,), stat rows (B, K) fp32)`` in the log-probs' dtype."""
    dtype = policy_logps.dtype
    p = policy_logps.detach()
    pw, pl = p.chunk(2)
    rw, rl = ref_logps.to(dtype).chunk(2)
    h = (pw - rw) - (pl - rl)
    delta = pairs.assignment.pair_margins(pairs.margin_table).to(dtype)
    signs = pairs.signs.to(dtype)
    z = beta * h - signs * delta
    loss, dldh = FAMILY_FORMULAS[family](h, z, beta)
    poison = torch.isnan(signs) | torch.isnan(delta)
    loss = torch.where(poison, float("nan"), loss)
    dldh = torch.where(poison, float("nan"), dldh)
    columns = [torch.ones_like(loss), loss, torch.sigmoid(-beta * h), (z > 0).to(dtype), beta * h]
    values = torch.stack([*columns, (h > 0).to(dtype), (h == 0).to(dtype)], dim=-1).float()
    if policy_logps.requires_grad:
        loss = _PairLoss.apply(policy_logps, loss, dldh)
    return loss, values
