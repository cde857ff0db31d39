"""``backend="triton"`` pair terms as a custom op with autograd to the policy log-probs."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..constants import NUM_STATS
from ..kernels.pair_terms import LOSS_CODES, pair_terms_kernel

_BLOCK_B = 128


@torch.library.custom_op("catdpo_triton::pair_terms", mutates_args=())
def pair_terms_op(
    policy_logps: Tensor,
    ref_logps: Tensor,
    categories: Tensor | None,
    unsafe: Tensor | None,
    margins: Tensor | None,
    num_categories: int,
    margin: float,
    beta: float,
    loss_type: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(loss (B,), stat rows (B, K), ∂ℓ/∂h (B,))``, all fp32."""
    num_pairs = policy_logps.shape[0] // 2
    dev = policy_logps.device
    loss = torch.empty(num_pairs, device=dev, dtype=torch.float32)
    dldh = torch.empty_like(loss)
    stats = torch.empty(num_pairs, NUM_STATS, device=dev, dtype=torch.float32)
    # The kernel indexes these with unit strides: O(B) copies at most.
    if categories is None:
        cat_mode, cat, num_cats = 0, policy_logps, 0
    elif categories.dim() == 1:
        cat_mode, cat, num_cats = 1, categories.contiguous(), num_categories
    else:
        cat_mode, cat, num_cats = 2, categories.contiguous(), categories.shape[1]
    unsafe_f = unsafe.to(torch.float32).contiguous() if unsafe is not None else policy_logps
    margins_f = margins.to(torch.float32).contiguous() if margins is not None else policy_logps
    block_c = min(triton.next_power_of_2(max(num_cats if cat_mode == 2 else 1, 1)), 64)
    pair_terms_kernel[(triton.cdiv(num_pairs, _BLOCK_B),)](
        policy_logps.contiguous(), ref_logps.contiguous(), cat, unsafe_f, margins_f, loss, dldh, stats,
        num_pairs, num_cats, float(beta), float(margin),
        LOSS=LOSS_CODES[loss_type], CAT_MODE=cat_mode, HAS_UNSAFE=unsafe is not None, NUM_STATS=NUM_STATS,
        BLOCK_B=_BLOCK_B, BLOCK_C=block_c,
    )  # fmt: skip
    return loss, stats, dldh


@pair_terms_op.register_fake
def _(policy_logps, ref_logps, categories, unsafe, margins, num_categories, margin, beta, loss_type):
    num_pairs = policy_logps.shape[0] // 2
    loss = policy_logps.new_empty(num_pairs, dtype=torch.float32)
    return loss, policy_logps.new_empty(num_pairs, NUM_STATS, dtype=torch.float32), torch.empty_like(loss)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, _grad_stats, _grad_dldh):
    (dldh,) = ctx.saved_tensors
    g = grad_loss * dldh
    # ∂h/∂π_w = 1, ∂h/∂π_l = −1.
    return torch.cat([g, -g]), None, None, None, None, None, None, None, None


pair_terms_op.register_autograd(_backward, setup_context=_setup_context)


def pair_terms_triton(policy_logps, ref_logps, categories, unsafe, margins, *, num_categories, margin, beta, loss_type):
    """Same contract as ``pair_terms_torch``: ``(loss (B,), stat rows (B, K) fp32)``."""
    loss, stats, _ = pair_terms_op(
        policy_logps, ref_logps.float().contiguous(), categories, unsafe, margins, int(num_categories),
        float(margin), float(beta), loss_type,
    )  # fmt: skip
    return loss, stats
