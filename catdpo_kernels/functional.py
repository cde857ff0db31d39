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


# The tile schedule is sized by host-side token counts (the head's one sync), so under
# torch.compile the head runs eagerly: one graph break, the documented sync.
@torch.compiler.disable
def linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    categories: torch.Tensor | None = None,
    margins: torch.Tensor | CategoryMargins | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
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
    num_categories: int | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    memory_budget: int | None = None,
    return_metrics: bool = False,
):
    """The Cat-DPO loss from the last hidden states and the output embedding, never building the logits.

    Same math, options and ``LossOutput`` as ``loss()``; the logits are
    ``transform(hidden @ weight.T + bias)``, computed one tile at a time for the
    counted tokens only.

    Args:
        hidden: padded ``(2B, T, H)`` (rows ``[0, B)`` chosen), or packed ``(N, H)`` with ``cu_seqlens``.
        weight: ``(V, H)`` output embedding (``model.get_output_embeddings().weight``; tied weights work).
        labels: ``(2B, T)`` or ``(N,)`` token ids, ``ignore_index`` where not counted.
        bias: optional ``(V,)`` output bias.
        ref_hidden / ref_weight / ref_bias: the reference model's hidden states and head (forward only;
            ``ref_weight=None`` reuses the policy's weight and bias, detached). Or ``ref_logps (2B,)``.
        cu_seqlens: ``(2B + 1,)`` sequence boundaries of the packed layout, chosen sequences first;
            ``shift_labels`` then shifts within each sequence.
        temperature, logit_scale, final_logit_softcapping: the head's transform,
            ``z = c·tanh(scale·logit / c) / temperature`` (Cohere's scale, Gemma's soft-cap).
        memory_budget: bytes of logits tiles and accumulators (default 256 MiB on CUDA, 128 MiB
            on CPU); it does not grow with ``B`` or ``T``.
        return_metrics: also return ``HeadMetrics`` (per-sequence entropy, mean logit and top-1
            sums, from the same pass): ``(LossOutput, HeadMetrics)``.

    The other arguments are those of ``loss()``. Gradients flow to ``hidden``, ``weight``
    and ``bias``; with ``weight.requires_grad=False`` (a frozen head, as with LoRA) the
    weight-gradient GEMM is skipped. Building the token layout reads the per-sequence
    token counts on the host (one sync); under ``torch.compile`` the call is one graph
    break and runs eagerly.
    """
    from .fused_head import HeadCall, SideInputs
    from .head import DEFAULT_BUDGET_BYTES, HeadTransform, TokenLayout

    opts = LossOptions(
        loss_type=loss_type,
        beta=beta,
        margin=margin,
        reduction=reduction,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
        average_log_prob=average_log_prob,
        check_inputs=check_inputs,
        backend=backend,
    )
    transform = HeadTransform(temperature, logit_scale, final_logit_softcapping)
    rows, vocab = checks.check_head(
        hidden, weight, bias, labels, cu_seqlens, shift_labels=shift_labels, fused=backend != "reference"
    )
    checks.check_ref_head(
        ref_hidden,
        ref_weight,
        ref_bias,
        ref_logps,
        hidden=hidden,
        weight=weight,
        rows=rows,
        fused=backend != "reference",
    )
    budget = checks.check_budget(memory_budget)
    device = hidden.device
    impl = resolve_backend(opts.backend, device)
    checks.check_backend_dtypes(impl, hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight)
    pairs, margins = canonical_pairs(
        categories, margins, unsafe, num_categories, opts, num_pairs=rows // 2, device=device
    )
    if cu_seqlens is None:
        layout = TokenLayout.padded(labels, ignore_index=ignore_index, shift=shift_labels, vocab=vocab)
    else:
        layout = TokenLayout.packed(labels, cu_seqlens, ignore_index=ignore_index, shift=shift_labels, vocab=vocab)
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
            unread=_unread_labels(labels, cu_seqlens, shift_labels),
        )
    if ref_hidden is not None and ref_weight is None:
        ref_weight, ref_bias = weight.detach(), (None if bias is None else bias.detach())
    width = weight.shape[1]
    call = HeadCall(
        policy=SideInputs(hidden.reshape(-1, width), weight, bias),
        ref=None
        if ref_hidden is None
        else SideInputs(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias),
        ref_logps=ref_logps,
        layout=layout,
        transform=transform,
        budget=budget if budget is not None else DEFAULT_BUDGET_BYTES.get(device.type, DEFAULT_BUDGET_BYTES["cpu"]),
        compute_dtype=_head_compute_dtype(hidden, device),
        ref_compute_dtype=None if ref_hidden is None else _head_compute_dtype(ref_hidden, device),
        labels=labels,
        cu_seqlens=cu_seqlens,
        want_metrics=bool(return_metrics),
    )
    if impl.name == "reference":
        out, metrics = impl.linear_loss(call, pairs, opts)
    else:
        with _autocast_off(device):
            out, metrics = impl.linear_loss(call, pairs, opts)
    return (out, metrics) if return_metrics else out


def _head_compute_dtype(hidden: torch.Tensor, device: torch.device) -> torch.dtype:
    """The dtype of the head's GEMMs: autocast's when it is on (as the model's own head would), else the inputs'."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return hidden.dtype


def _unread_labels(labels, cu_seqlens, shift_labels):
    """Label positions no token is scored against (the first of each sequence under ``shift_labels``)."""
    if not shift_labels:
        return None
    unread = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    if cu_seqlens is None:
        unread[:, 0] = True
    else:
        starts = cu_seqlens[:-1].to(device=labels.device, dtype=torch.int64)
        unread[starts[starts < labels.shape[0]]] = True
    return unread
