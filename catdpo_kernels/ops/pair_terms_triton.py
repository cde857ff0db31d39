"""``backend="triton"`` pair terms as a custom op with autograd to the policy log-probs."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..constants import NUM_STATS
from ..kernels.pair_terms import pair_terms_kernel
from ..loss_types import FAMILIES
from ..pairs import PairInputs
from .device_guard import on_device_of
from .first_order import refuse_double_backward

_BLOCK_B = 128


@torch.library.custom_op("catdpo_triton::pair_terms", mutates_args=())
def pair_terms_op(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rows: Tensor | None,
    member: Tensor | None,
    margin_table: Tensor,
    signs: Tensor,
    beta: float,
    family: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(loss (B,), stat rows (B, K), ∂ℓ/∂h (B,))``, all fp32.

    Exactly one of ``rows`` (``(B,)`` int64) and ``member`` (``(B, C+1)`` bool) is given.
    """
    num_pairs = policy_logps.shape[0] // 2
    dev = policy_logps.device
    loss = torch.empty(num_pairs, device=dev, dtype=torch.float32)
    dldh = torch.empty_like(loss)
    stats = torch.empty(num_pairs, NUM_STATS, device=dev, dtype=torch.float32)
    multi_hot = member is not None
    num_rows = member.shape[1] if multi_hot else margin_table.shape[0]
    # The kernel indexes these with unit strides: O(B) copies at most.
    member_u8 = member.contiguous().view(torch.uint8) if multi_hot else policy_logps
    rows_c = rows.contiguous() if rows is not None else policy_logps
    with on_device_of(policy_logps):
        pair_terms_kernel[(triton.cdiv(num_pairs, _BLOCK_B),)](
            policy_logps.float().contiguous(),
            ref_logps.float().contiguous(),
            rows_c,
            member_u8,
            margin_table.float().contiguous(),
            signs.float().contiguous(),
            loss,
            dldh,
            stats,
            num_pairs,
            num_rows,
            float(beta),
            FAMILY=FAMILIES.index(family),
            MULTI_HOT=multi_hot,
            NUM_STATS=NUM_STATS,
            BLOCK_B=_BLOCK_B,
            BLOCK_C=min(triton.next_power_of_2(max(num_rows, 1)), 64),
        )
    return loss, stats, dldh


@pair_terms_op.register_fake
def _(policy_logps, ref_logps, rows, member, margin_table, signs, beta, family):
    num_pairs = policy_logps.shape[0] // 2
    loss = policy_logps.new_empty(num_pairs, dtype=torch.float32)
    return loss, policy_logps.new_empty(num_pairs, NUM_STATS, dtype=torch.float32), torch.empty_like(loss)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, _grad_stats, _grad_dldh):
    refuse_double_backward()
    (dldh,) = ctx.saved_tensors
    g = grad_loss * dldh
    # ∂h/∂π_w = 1, ∂h/∂π_l = −1.
    return torch.cat([g, -g]), None, None, None, None, None, None, None


pair_terms_op.register_autograd(_backward, setup_context=_setup_context)


def pair_terms_triton(policy_logps, ref_logps, pairs: PairInputs, *, beta: float, family: str):
    """Same contract as ``pair_terms_torch``: ``(loss (B,), stat rows (B, K) fp32)``."""
    a = pairs.assignment
    loss, stats, _ = pair_terms_op(
        policy_logps, ref_logps.float(), a.rows, a.member, pairs.margin_table, pairs.signs, float(beta), family
    )
    return loss, stats
