"""The schedule of a fused-head call, shared by the backends that fuse it (``torch``, ``triton``).

Given the canonical inputs (``HeadCall``, ``PairInputs``, ``LossOptions``):

1. the reference log-probs: given, or scored tile by tile without autograd;
2. the policy: forward only (no gradient needed), the one-pass schedule (a
   scalar reduction and whole pairs fit a tile), or the two-pass schedule;
3. the pair stage and the reduction, as for ``loss()``.

A backend contributes its tile kernels through ``Backend.head_kernels()``: a
module with ``HeadSide``, ``score_tokens``, ``sequence_logps``,
``tile_element_bytes``, ``one_pass_extra_bytes``, ``OnePassHead`` and
``TwoPassHead``. The one-pass schedule is taken when whole pairs fit a tile
next to the accumulators it needs, within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .head import HeadMetrics, HeadPlan, HeadTransform, TokenLayout, pair_groups
from .ops.category_stats import category_mean_weights
from .options import LossOptions
from .pairs import PairInputs


@dataclass
class SideInputs:
    hidden_rows: torch.Tensor
    """``(R, H)``: the padded ``(2B, T, H)`` or packed ``(N, H)`` hidden states as rows."""
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class HeadCall:
    policy: SideInputs
    ref: SideInputs | None
    ref_logps: torch.Tensor | None
    layout: TokenLayout
    transform: HeadTransform
    budget: int
    compute_dtype: torch.dtype
    """The policy head's GEMM dtype (autocast's when on, else the policy's hidden states')."""
    ref_compute_dtype: torch.dtype | None
    """The same for the reference head (``None`` without one)."""
    labels: torch.Tensor
    """The labels as given: ``(2B, T)`` padded or ``(N,)`` packed (the naive baseline reads them)."""
    cu_seqlens: torch.Tensor | None = None
    want_metrics: bool = False


def reduction_weights(pairs: PairInputs, reduction: str, dtype: torch.dtype) -> torch.Tensor | None:
    """``w`` with ``reduced loss = Σ w·ℓ`` for the scalar reductions; ``None`` for ``"none"``."""
    b, dev = pairs.num_pairs, pairs.signs.device
    if reduction == "none":
        return None
    if reduction == "sum":
        return torch.ones(b, dtype=dtype, device=dev)
    if reduction == "mean":
        return torch.full((b,), 1.0 / max(b, 1), dtype=dtype, device=dev)
    counts = pairs.assignment.membership(torch.float64).sum(0)
    return category_mean_weights(counts, pairs.assignment).to(dtype)


def _needs_grad(side: SideInputs) -> bool:
    tensors = (side.hidden_rows, side.weight, side.bias)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plan(kernels, call: HeadCall, side, opts: LossOptions) -> HeadPlan:
    rows_per_tile = max(1, call.budget // (side.vocab * kernels.tile_element_bytes(side, call.transform)))
    return HeadPlan(
        layout=call.layout,
        transform=call.transform,
        average=opts.average_log_prob,
        rows_per_tile=rows_per_tile,
        compute_dtype=call.compute_dtype,
        kernels=kernels,
        want_metrics=call.want_metrics,
    )


def reference_logps(kernels, call: HeadCall, opts: LossOptions) -> torch.Tensor:
    if call.ref_logps is not None:
        return call.ref_logps.detach()
    r = call.ref
    side = kernels.HeadSide(
        r.hidden_rows.detach(), r.weight.detach(), None if r.bias is None else r.bias.detach(), call.ref_compute_dtype
    )
    plan = _plan(kernels, call, side, opts)
    with torch.no_grad():
        token_logp, _ = kernels.score_tokens(side, call.layout, call.transform, plan.rows_per_tile)
        return kernels.sequence_logps(token_logp, call.layout, opts.average_log_prob)


def fused_linear_loss(backend, call: HeadCall, pairs: PairInputs, opts: LossOptions):
    """Returns ``(LossOutput, HeadMetrics or None)``."""
    from .functional import LossOutput, pair_stage

    kernels = backend.head_kernels()
    p = call.policy
    side = kernels.HeadSide(p.hidden_rows, p.weight, p.bias, call.compute_dtype)
    plan = _plan(kernels, call, side, opts)
    ref = reference_logps(kernels, call, opts)
    if not _needs_grad(p):
        metrics = plan.new_metrics()
        token_logp, _ = kernels.score_tokens(side, call.layout, call.transform, plan.rows_per_tile, metrics=metrics)
        plan.metrics = metrics
        policy = kernels.sequence_logps(token_logp, call.layout, opts.average_log_prob)
        return pair_stage(backend, policy, ref.to(policy.dtype), pairs, opts), plan.sequence_metrics()
    weights = reduction_weights(pairs, opts.reduction, side.acc_dtype)
    groups = None
    if weights is not None:
        needs_weight_grad = p.weight.requires_grad
        spare = call.budget - kernels.one_pass_extra_bytes(side, needs_weight_grad)
        rows = spare // (side.vocab * kernels.tile_element_bytes(side, call.transform))
        groups = pair_groups(call.layout, rows) if rows > 0 else None
    if groups is None:
        policy = kernels.TwoPassHead.apply(p.hidden_rows, p.weight, p.bias, plan)
        return pair_stage(backend, policy, ref.to(policy.dtype), pairs, opts), plan.sequence_metrics()
    ref = ref.to(side.acc_dtype)
    b = pairs.num_pairs

    def pair_grad(policy_group, i0, i1):
        with torch.enable_grad():
            x = policy_group.detach().requires_grad_()
            ref_group = torch.cat([ref[i0:i1], ref[b + i0 : b + i1]])
            loss, _ = backend.pair_terms(x, ref_group, pairs.narrow(i0, i1), opts)
            (g,) = torch.autograd.grad(loss, x, grad_outputs=weights[i0:i1].to(loss.dtype))
        return g

    def finish(policy):
        plan.result = pair_stage(backend, policy.detach(), ref, pairs, opts)
        return plan.result.loss

    plan.groups, plan.pair_grad, plan.finish = groups, pair_grad, finish
    policy, loss = kernels.OnePassHead.apply(p.hidden_rows, p.weight, p.bias, plan)
    out = plan.result
    return LossOutput(loss, policy, *out[2:]), plan.sequence_metrics()


__all__ = ["HeadCall", "HeadMetrics", "SideInputs", "fused_linear_loss", "reduction_weights"]
