"""Public entry points: ``loss()`` and the ``CatDPOLoss`` module.

``loss()`` checks its arguments, picks a backend and runs the three stages of
DESIGN.md §2.1: sequence log-probs, per-pair terms, per-category table.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import nn

from . import checks, reference
from .constants import STAT_INDEX
from .margins import CategoryMargins
from .ops.category_stats import category_mean_weights, category_table
from .ops.pair_terms_torch import pair_terms_torch
from .ops.sequence_logps_torch import policy_ref_logps_torch


class LossOutput(NamedTuple):
    """What ``loss()`` returns. Everything but ``loss`` and ``policy_logps`` is detached."""

    loss: torch.Tensor
    """Scalar, or ``(B,)`` with ``reduction="none"``; fp32 (fp64 for fp64 logits)."""
    policy_logps: torch.Tensor
    """``(2B,)`` sequence log-probs of the policy, chosen rows first; differentiable."""
    ref_logps: torch.Tensor
    """``(2B,)`` sequence log-probs of the reference."""
    chosen_rewards: torch.Tensor
    """``(B,)`` ``β(π_w − ρ_w)``."""
    rejected_rewards: torch.Tensor
    """``(B,)`` ``β(π_l − ρ_l)``."""
    category_stats: torch.Tensor
    """``(C+1, K)`` fp32 table, columns ``STAT_COLUMNS``; row ``C`` = pairs without a category."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA tensors, the memory-bounded torch path elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
                "TRITON_INTERPRET=1. Use backend='torch' or 'auto' for CPU tensors."
            )
    return backend


def _stage_functions(backend: str):
    if backend == "triton":
        from .ops.pair_terms_triton import pair_terms_triton
        from .ops.sequence_logps_triton import policy_ref_logps_triton

        return policy_ref_logps_triton, pair_terms_triton
    return policy_ref_logps_torch, pair_terms_torch


def _reduce(per_pair, table, categories, reduction):
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.mean()
    weights = category_mean_weights(table[:, STAT_INDEX["count"]], categories, per_pair.shape[0])
    return (weights.to(per_pair.dtype) * per_pair).sum()


def loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    categories: torch.Tensor | None = None,
    margins: torch.Tensor | CategoryMargins | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    unsafe: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "catdpo",
    margin: float = 0.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    shift_labels: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
    inplace_backward: bool = False,
    num_categories: int | None = None,
) -> LossOutput:
    """Cat-DPO (and DPO / IPO / SafeDPO) loss from policy logits, fused.

    Args:
        policy_logits: ``(2B, T, V)``; rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
            fp32/bf16/fp16 (fp64 on the torch/reference backends); any strides with a
            contiguous vocab dim.
        labels: ``(2B, T)`` integer token ids, ``ignore_index`` where not counted.
        categories: ``(B,)`` int ids in ``[-1, C)`` (``-1`` = none) or ``(B, C)`` bool multi-hot.
        margins: ``(C,)`` per-category ``Δ_c`` or a ``CategoryMargins`` (``catdpo`` only).
        ref_logits / ref_logps: the reference model's ``(2B, T, V)`` logits or ``(2B,)``
            sequence log-probs; exactly one.
        unsafe: ``(2B,)`` 0/1 flag per response row; ``s = h_l − h_w``. ``None``: ``s = 1``
            for pairs with a category.
        beta: DPO temperature ``β > 0``.
        loss_type: ``dpo``, ``ipo``, ``safedpo`` (scalar ``margin``) or ``catdpo`` (``margins``).
        reduction: ``mean``, ``sum``, ``none`` or ``category_mean``.
        backend: ``auto``, ``triton``, ``torch`` or ``reference``.
        check_inputs: validate value ranges too (a host sync on CUDA). Off: bad labels or
            categories give a NaN loss, never an out-of-bounds access.
        inplace_backward: write the logits gradient into ``policy_logits`` (no extra
            ``(2B, T, V)`` buffer). Only for logits nothing else reads afterwards.
        num_categories: ``C`` when neither ``margins`` nor multi-hot ``categories`` fix it.
    """
    checks.check_options(
        beta=beta, loss_type=loss_type, reduction=reduction, backend=backend, margin=margin, ignore_index=ignore_index
    )
    fused = backend != "reference"
    rows, _, vocab = checks.check_logits(
        policy_logits, labels, ref_logits, ref_logps, shift_labels=shift_labels, fused=fused
    )
    device = policy_logits.device
    backend = resolve_backend(backend, device)
    if backend == "triton":
        for name, t in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
            if t is not None and t.dtype == torch.float64:
                raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 {name}, got float64; use backend='torch'")
    if isinstance(margins, CategoryMargins):
        margins = margins.value_on(device)
    num_cats = checks.check_categories(
        categories, margins, num_categories, num_pairs=rows // 2, loss_type=loss_type, device=device
    )
    checks.check_unsafe(unsafe, rows=rows, device=device)
    if inplace_backward:
        checks.check_inplace_target(policy_logits)
    if check_inputs:
        checks.check_values(
            labels=labels, ignore_index=ignore_index, vocab=vocab, categories=categories,
            num_categories=num_cats, unsafe=unsafe, margins=margins if loss_type == "catdpo" else None,
            shift_labels=shift_labels,
        )  # fmt: skip
    if categories is not None and categories.dim() == 1:
        categories = categories.long()
    margins = margins.detach() if margins is not None and loss_type == "catdpo" else None

    autocast_off = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()
    with autocast_off:
        if backend == "reference":
            out = reference.catdpo_loss(
                policy_logits, labels, categories, margins, ref_logits=ref_logits, ref_logps=ref_logps,
                unsafe=unsafe, beta=beta, loss_type=loss_type, margin=margin, ignore_index=ignore_index,
                average_log_prob=average_log_prob, shift_labels=shift_labels, reduction=reduction,
                num_categories=num_cats,
            )  # fmt: skip
            return LossOutput(*out)
        sequence_logps, pair_terms = _stage_functions(backend)
        policy, ref = sequence_logps(
            policy_logits, None if ref_logits is None else ref_logits.detach(), labels,
            ignore_index=ignore_index, average_log_prob=average_log_prob, shift_labels=shift_labels,
            inplace_backward=inplace_backward,
        )  # fmt: skip
        ref = (ref_logps if ref is None else ref).detach().to(policy.dtype)
        per_pair, values = pair_terms(
            policy, ref, categories, unsafe, margins,
            num_categories=num_cats, margin=margin, beta=beta, loss_type=loss_type,
        )  # fmt: skip
        table = category_table(values, categories, num_cats)
        rewards = (beta * (policy.detach() - ref)).chunk(2)
        return LossOutput(_reduce(per_pair, table, categories, reduction), policy, ref, rewards[0], rewards[1], table)


class CatDPOLoss(nn.Module):
    """``loss()`` as a module that owns its ``CategoryMargins`` and the stats of the step.

    Call it once per micro-batch; in training mode with grad enabled it sums
    ``category_stats`` until ``update_margins()``, which you call once per optimiser
    step (it all-reduces across ranks). Evaluation calls leave the margins alone.
    """

    def __init__(
        self,
        num_categories: int | None = None,
        *,
        margins: CategoryMargins | None = None,
        beta: float = 0.1,
        loss_type: str = "catdpo",
        margin: float = 0.0,
        ignore_index: int = -100,
        average_log_prob: bool = False,
        shift_labels: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        check_inputs: bool = True,
        inplace_backward: bool = False,
        **margin_kwargs,
    ):
        super().__init__()
        checks.check_options(
            beta=beta, loss_type=loss_type, reduction=reduction, backend=backend, margin=margin, ignore_index=ignore_index
        )
        if margins is None and num_categories is not None and num_categories > 0:
            margins = CategoryMargins(num_categories, **margin_kwargs)
        elif margin_kwargs:
            raise TypeError(f"unexpected arguments {sorted(margin_kwargs)} (CategoryMargins options need num_categories and no margins=)")
        if loss_type == "catdpo" and margins is None:
            raise ValueError("CatDPOLoss with loss_type='catdpo' needs num_categories or margins=CategoryMargins(...)")
        if margins is not None and num_categories is not None and len(margins) != num_categories:
            raise ValueError(f"margins has C={len(margins)} but num_categories={num_categories}")
        self.margins = margins
        self.num_categories = len(margins) if margins is not None else num_categories
        self.options = dict(
            beta=beta, loss_type=loss_type, margin=margin, ignore_index=ignore_index,
            average_log_prob=average_log_prob, shift_labels=shift_labels, reduction=reduction,
            backend=backend, check_inputs=check_inputs, inplace_backward=inplace_backward,
        )  # fmt: skip
        self.pending_stats: torch.Tensor | None = None

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() move the margins too: loss() then never copies them.
        super()._apply(fn, *args, **kwargs)
        if self.margins is not None:
            self.margins.to(fn(self.margins.value).device)
        return self

    def forward(self, policy_logits, labels, categories=None, *, ref_logits=None, ref_logps=None, unsafe=None) -> LossOutput:
        out = loss(
            policy_logits, labels, categories,
            self.margins if self.options["loss_type"] == "catdpo" else None,
            ref_logits=ref_logits, ref_logps=ref_logps, unsafe=unsafe,
            num_categories=self.num_categories, **self.options,
        )  # fmt: skip
        # Only training steps feed the margins: evaluation under no_grad (or .eval())
        # must not move them.
        if self.training and torch.is_grad_enabled():
            stats = out.category_stats.detach()
            self.pending_stats = stats.clone() if self.pending_stats is None else self.pending_stats + stats
        return out

    def update_margins(self, *, unsafe_rate=None) -> torch.Tensor | None:
        """Feed the stats summed since the last call to the margins; returns the new margins."""
        stats, self.pending_stats = self.pending_stats, None
        if self.margins is None:
            return None
        if stats is None and unsafe_rate is None:
            raise RuntimeError("update_margins() before any forward(): no category stats to update from")
        return self.margins.update(stats, unsafe_rate=unsafe_rate)

    def get_extra_state(self):
        return {"margins": self.margins.state_dict() if self.margins is not None else None}

    def set_extra_state(self, state):
        if self.margins is not None and state.get("margins") is not None:
            self.margins.load_state_dict(state["margins"])
