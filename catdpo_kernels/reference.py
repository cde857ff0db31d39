"""Naive PyTorch Cat-DPO: the ground truth for tests and the baseline for benchmarks.

Written the way TRL computes DPO: upcast the whole ``(2B, T, V)`` logits to fp32
(or keep float64), ``log_softmax``, gather, masked sum. Every intermediate is
materialised, which is exactly what the fused backends avoid. Keep this file
obviously correct rather than fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, float64 stays float64 (the tests' ground truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    shift_labels: bool = False,
) -> torch.Tensor:
    """Sum (or mean) over unmasked tokens of ``log_softmax(logits)[label]``: ``(N,)``.

    A label that is neither ``ignore_index`` nor in ``[0, V)`` gives NaN for its
    sequence instead of an out-of-bounds read.
    """
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    vocab = logits.shape[-1]
    logp = logits.to(compute_dtype(logits.dtype)).log_softmax(-1)
    mask = labels != ignore_index
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(mask & valid, labels, torch.zeros_like(labels))
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    tok = torch.where(mask & ~valid, torch.full_like(tok, float("nan")), tok)
    out = tok.sum(-1)
    if average_log_prob:
        out = out / mask.sum(-1).clamp(min=1).to(out.dtype)
    return out


def pair_margins(
    loss_type: str,
    num_pairs: int,
    categories: torch.Tensor | None,
    margins: torch.Tensor | None,
    margin: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``Δ`` for every pair: 0 for dpo/ipo, the scalar for safedpo, ``Δ_c`` for catdpo.

    Multi-hot pairs take the largest ``Δ_c`` over their categories; pairs with
    no category (id ``-1`` or an all-false row) get 0.
    """
    if loss_type in ("dpo", "ipo"):
        return torch.zeros(num_pairs, device=device, dtype=dtype)
    if loss_type == "safedpo":
        return torch.full((num_pairs,), float(margin), device=device, dtype=dtype)
    delta = margins.to(device=device, dtype=dtype)
    if categories is None:
        return torch.zeros(num_pairs, device=device, dtype=dtype)
    if categories.dim() == 2:
        per_cat = torch.where(categories, delta.expand_as(categories), torch.full_like(delta, float("-inf")))
        return torch.where(categories.any(-1), per_cat.max(-1).values, torch.zeros(num_pairs, device=device, dtype=dtype))
    # Slot C is "no category" (Δ = 0); slot C+1 is an out-of-range id, only
    # reachable with check_inputs=False, which must poison the pair with NaN.
    num_cats = delta.numel()
    padded = torch.cat([delta, delta.new_zeros(1), delta.new_full((1,), float("nan"))])
    idx = torch.where(categories < 0, torch.full_like(categories, num_cats), categories)
    idx = torch.where((categories < -1) | (categories >= num_cats), torch.full_like(categories, num_cats + 1), idx)
    return padded[idx]


def pair_safety(categories: torch.Tensor | None, unsafe: torch.Tensor | None, num_pairs: int, device) -> torch.Tensor:
    """``s = h_l - h_w`` from the flags, or 1 for any pair that has a category."""
    if unsafe is not None:
        u = unsafe.to(torch.float64)
        return u[num_pairs:] - u[:num_pairs]
    if categories is None:
        return torch.zeros(num_pairs, device=device, dtype=torch.float64)
    has_cat = categories.any(-1) if categories.dim() == 2 else categories >= 0
    return has_cat.to(torch.float64)


def invalid_categories(categories: torch.Tensor | None, num_categories: int) -> torch.Tensor | None:
    """Pairs whose category id lies outside ``[-1, C)``: reachable only with ``check_inputs=False``."""
    if categories is None or categories.dim() == 2:
        return None
    return (categories < -1) | (categories >= num_categories)


def pair_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    safety: torch.Tensor,
    delta: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    invalid: torch.Tensor | None = None,
):
    """Per-pair loss ``ℓ``, ``h`` and ``z`` (DESIGN.md §1.2), in the log-probs' dtype.

    ``invalid`` pairs (an out-of-range category id) get a NaN loss whatever the
    loss type: a bad id must never pass as a plausible number.
    """
    pw, pl = policy_logps.chunk(2)
    rw, rl = ref_logps.to(policy_logps.dtype).chunk(2)
    h = (pw - rw) - (pl - rl)
    z = beta * h - safety.to(h.dtype) * delta.to(h.dtype)
    if loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        # dpo has delta == 0, so z == beta * h.
        loss = -F.logsigmoid(z)
    if invalid is not None:
        loss = torch.where(invalid, torch.full_like(loss, float("nan")), loss)
    return loss, h, z


def pair_stat_values(loss: torch.Tensor, h: torch.Tensor, z: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-pair row ``(count, ℓ, σ(-βh), 1[z>0], βh, 1[h>0])`` of every pair: ``(B, K)`` fp32."""
    loss, h, z = loss.detach(), h.detach(), z.detach()
    cols = [
        torch.ones_like(loss),
        loss,
        torch.sigmoid(-beta * h),
        (z > 0).to(loss.dtype),
        beta * h,
        (h > 0).to(loss.dtype),
    ]
    return torch.stack(cols, dim=-1).float()


def category_membership(categories: torch.Tensor | None, num_pairs: int, num_categories: int, device) -> torch.Tensor:
    """Dense ``(B, C+1)`` 0/1 matrix: which stats rows each pair counts in."""
    member = torch.zeros(num_pairs, num_categories + 1, device=device, dtype=torch.float64)
    if categories is None:
        member[:, num_categories] = 1
        return member
    if categories.dim() == 2:
        member[:, :num_categories] = categories.to(torch.float64)
        member[:, num_categories] = (~categories.any(-1)).to(torch.float64)
        return member
    # Ids outside [-1, C) (only reachable with check_inputs=False) count nowhere.
    for row in range(num_categories + 1):
        target = -1 if row == num_categories else row
        member[:, row] = (categories == target).to(torch.float64)
    return member


def category_stats(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Segment sums as a dense matmul: ``member.T @ values`` -> ``(C+1, K)`` fp32."""
    return (member.T @ values.to(torch.float64)).float()


def category_mean(loss: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Mean over rows with pairs of each row's mean loss; differentiable in ``loss``."""
    member = member.to(loss.dtype)
    count = member.sum(0)
    row_sum = member.T @ loss
    active = count > 0
    row_mean = torch.where(active, row_sum / count.clamp(min=1), torch.zeros_like(row_sum))
    out = row_mean.sum() / active.sum().clamp(min=1)
    # A pair in no row has an out-of-range id (checks off): NaN, not a silent drop.
    lost = (member.sum(1) == 0).any()
    return torch.where(lost, torch.full_like(out, float("nan")), out)


def reduce_loss(loss: torch.Tensor, reduction: str, member: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return category_mean(loss, member)


def catdpo_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    categories: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
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
    num_categories: int | None = None,
):
    """The whole naive loss. Returns ``(loss, policy_logps, ref_logps, chosen_rewards,
    rejected_rewards, category_stats)``. No argument checking: ``loss()`` does that."""
    seq = dict(ignore_index=ignore_index, average_log_prob=average_log_prob, shift_labels=shift_labels)
    policy = sequence_logps(policy_logits, labels, **seq)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = sequence_logps(ref_logits, labels, **seq)
    ref = ref_logps.detach().to(policy.dtype)
    num_pairs = policy.shape[0] // 2
    if num_categories is None:
        num_categories = margins.numel() if margins is not None else (categories.shape[1] if categories is not None and categories.dim() == 2 else 0)
    device = policy.device
    delta = pair_margins(loss_type, num_pairs, categories, margins, margin, device, policy.dtype)
    s = pair_safety(categories, unsafe, num_pairs, device)
    invalid = invalid_categories(categories, num_categories)
    loss, h, z = pair_loss(policy, ref, s, delta, beta=beta, loss_type=loss_type, invalid=invalid)
    member = category_membership(categories, num_pairs, num_categories, device)
    stats = category_stats(pair_stat_values(loss, h, z, beta), member)
    rewards = (beta * (policy - ref)).detach()
    chosen, rejected = rewards.chunk(2)
    return reduce_loss(loss, reduction, member), policy, ref, chosen, rejected, stats
