"""The fused backends are differentiable once: a second-order gradient raises instead of vanishing.

``torch.autograd.function.once_differentiable`` alone only guards when the
upstream gradient requires grad; with ``create_graph=True`` (a gradient penalty,
say) the fused gradients would come back detached and the penalty would
silently contribute nothing.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

MESSAGE = (
    "catdpo_kernels' fused backends are differentiable once: a second-order gradient "
    "(create_graph=True, e.g. a gradient penalty) is not supported; use backend='reference' for it"
)


def refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(MESSAGE)


def first_order(backward):
    """``@staticmethod``-ready backward decorator: ``once_differentiable`` plus the clear refusal."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        refuse_double_backward()
        return inner(ctx, *grads)

    return wrapper
