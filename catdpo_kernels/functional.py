"""``loss()``: the Cat-DPO loss from logits, in four steps: check, canonicalise, dispatch, reduce.

1. **check**: ``LossOptions`` validates the scalar options; ``checks`` the tensors.
2. **canonicalise**: ``PairInputs`` turns ``categories``, ``margins`` and ``unsafe``
   into stats rows, a margin table and signs, once.
3. **dispatch**: the backend (``backends.resolve_backend``) runs the sequence
   stage, the pair stage and the category table.
4. **reduce**: ``mean``, ``sum``, ``none`` or ``category_mean``, shared by all backends.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import checks
from .backends import Backend, resolve_backend
from .categories import CategoryAssignment
from .margins import CategoryMargins
from .ops.category_stats import category_mean_weights
from .options import LossOptions
from .pairs import PairInputs


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
        margins: ``(C,)`` per-category ``Δ_c`` or a ``CategoryMargins``; read by ``catdpo``
            only, and refused (``ValueError``) for the loss types that would ignore it.
        ref_logits / ref_logps: the reference model's ``(2B, T, V)`` logits or ``(2B,)``
            sequence log-probs; exactly one.
        unsafe: ``(2B,)`` 0/1 flag per response row; ``s = h_l − h_w``. ``None``: ``s = 1``
            for pairs with a category.
        beta: DPO temperature ``β > 0``.
        loss_type: ``dpo``, ``ipo``, ``safedpo`` (scalar ``margin``) or ``catdpo`` (``margins``).
        margin: SafeDPO's one global ``Δ``; refused for the other loss types unless 0.
        reduction: ``mean``, ``sum``, ``none`` or ``category_mean``.
        backend: ``auto``, ``triton``, ``torch`` or ``reference``.
        check_inputs: validate value ranges too (a host sync on CUDA). Off: bad labels,
            categories or unsafe flags give a NaN loss, never an out-of-bounds access.
        inplace_backward: write the logits gradient into ``policy_logits`` (no extra
            ``(2B, T, V)`` buffer). Only for logits nothing else reads afterwards.
        num_categories: ``C`` when neither ``margins`` nor multi-hot ``categories`` fix it.
    """
    opts = LossOptions(
        loss_type=loss_type,
        beta=beta,
        margin=margin,
        reduction=reduction,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
        average_log_prob=average_log_prob,
        inplace_backward=inplace_backward,
        check_inputs=check_inputs,
        backend=backend,
    )
    rows, _, vocab = checks.check_logits(
        policy_logits, labels, ref_logits, ref_logps, shift_labels=shift_labels, fused=backend != "reference"
    )
    device = policy_logits.device
    impl = resolve_backend(opts.backend, device)
    checks.check_backend_dtypes(impl, policy_logits=policy_logits, ref_logits=ref_logits)
    if opts.inplace_backward:
        checks.check_inplace_target(policy_logits)
    pairs, margins = canonical_pairs(
        categories, margins, unsafe, num_categories, opts, num_pairs=rows // 2, device=device
    )
    if opts.check_inputs:
        checks.check_values(
            labels=labels,
            ignore_index=ignore_index,
            vocab=vocab,
            assignment=pairs.assignment,
            categories=categories,
            unsafe=unsafe,
            margins=margins,
            shift_labels=shift_labels,
        )
    with _autocast_off(device):
        ref = None if ref_logits is None else ref_logits.detach()
        policy, ref = impl.sequence_logps(policy_logits, ref, labels, opts)
        ref = (ref_logps if ref is None else ref).detach().to(policy.dtype)
        return pair_stage(impl, policy, ref, pairs, opts)


def canonical_pairs(categories, margins, unsafe, num_categories, opts: LossOptions, *, num_pairs: int, device):
    """Check and canonicalise the per-pair arguments; returns ``(PairInputs, margins tensor or None)``."""
    if isinstance(margins, CategoryMargins):
        margins = margins.value_on(device)
    spec = opts.spec
    num_cats = checks.check_categories(
        categories, margins, num_categories, num_pairs=num_pairs, spec=spec, device=device
    )
    checks.check_unsafe(unsafe, rows=2 * num_pairs, device=device)
    pairs = PairInputs.build(
        spec, categories, margins, opts.margin, unsafe, num_categories=num_cats, num_pairs=num_pairs, device=device
    )
    return pairs, margins


def pair_stage(
    impl: Backend, policy: torch.Tensor, ref: torch.Tensor, pairs: PairInputs, opts: LossOptions
) -> LossOutput:
    """Pair terms, the category table and the reduction: everything after the sequence log-probs."""
    per_pair, values = impl.pair_terms(policy, ref, pairs, opts)
    table = impl.category_table(values, pairs.assignment)
    chosen, rejected = (opts.beta * (policy.detach() - ref)).chunk(2)
    return LossOutput(reduce(per_pair, table, pairs.assignment, opts.reduction), policy, ref, chosen, rejected, table)


def reduce(per_pair: torch.Tensor, table: torch.Tensor, assignment: CategoryAssignment, reduction: str) -> torch.Tensor:
    """The requested reduction of the ``(B,)`` per-pair loss."""
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.mean()
    weights = category_mean_weights(table[:, 0], assignment)
    return (weights.to(per_pair.dtype) * per_pair).sum()


def _autocast_off(device: torch.device):
    """The loss runs in its own precision: log-probs accumulate in fp32 whatever autocast says."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
