"""Naive PyTorch Cat-DPO: the ground truth for tests and the baseline for benchmarks.

Written the way TRL computes DPO: upcast the whole ``(2B, T, V)`` logits to fp32
(or keep float64), ``log_softmax``, gather, masked sum. Every intermediate is
materialised, which is exactly what the fused backends avoid. Keep this file
obviously correct rather than fast; the fused backends never import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .categories import CategoryAssignment


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
    exact_ignored: bool = True,
) -> torch.Tensor:
    """Sum (or mean) over unmasked tokens of ``log_softmax(logits)[label]``: ``(N,)``.

    A label that is neither ``ignore_index`` nor in ``[0, V)`` gives NaN for its
    sequence instead of an out-of-bounds read. ``exact_ignored`` zeroes the logits
    of ignored positions first, so that their gradient is exactly 0 whatever they
    hold (NaN·0 is NaN); ``False`` is the plain TRL-style loss the benchmarks time.
    """
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    vocab = logits.shape[-1]
    mask = labels != ignore_index
    x = logits.to(compute_dtype(logits.dtype))
    if exact_ignored:
        x = torch.where(mask.unsqueeze(-1), x, 0.0)
    logp = x.log_softmax(-1)
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(mask & valid, labels, torch.zeros_like(labels))
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    tok = torch.where(mask & ~valid, torch.full_like(tok, float("nan")), tok)
    out = tok.sum(-1)
    if average_log_prob:
        out = out / mask.sum(-1).clamp(min=1).to(out.dtype)
    return out


# The per-pair loss of each family (see catdpo_kernels.loss_types), as plainly as possible.
PAIR_FORMULAS = {
    "sigmoid": lambda h, z, beta: -F.logsigmoid(z),
    "ipo": lambda h, z, beta: (h - 1.0 / (2.0 * beta)) ** 2,
}


def pair_loss(policy_logps, ref_logps, signs, delta, *, beta: float, family: str):
    """Per-pair loss ``ℓ``, ``h`` and ``z`` in the log-probs' dtype.

    A NaN sign or margin (an invalid category id or unsafe flag, only reachable
    with ``check_inputs=False``) gives a NaN loss whatever the family.
    """
    pw, pl = policy_logps.chunk(2)
    rw, rl = ref_logps.to(policy_logps.dtype).chunk(2)
    h = (pw - rw) - (pl - rl)
    z = beta * h - signs.to(h.dtype) * delta.to(h.dtype)
    loss = PAIR_FORMULAS[family](h, z, beta)
    poison = torch.isnan(signs) | torch.isnan(delta)
    return torch.where(poison, torch.full_like(loss, float("nan")), loss), h, z


def pair_stat_values(loss: torch.Tensor, h: torch.Tensor, z: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-pair row ``(count, ℓ, σ(-βh), 1[z>0], βh, 1[h>0], 1[h=0])`` of every pair: ``(B, K)`` fp32."""
    loss, h, z = loss.detach(), h.detach(), z.detach()
    cols = [
        torch.ones_like(loss),
        loss,
        torch.sigmoid(-beta * h),
        (z > 0).to(loss.dtype),
        beta * h,
        (h > 0).to(loss.dtype),
        (h == 0).to(loss.dtype),
    ]
    return torch.stack(cols, dim=-1).float()


def category_stats(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Row ``r`` of the ``(C+1, K)`` fp32 table is the float64 sum of the rows of the pairs in ``r``."""
    v = values.to(torch.float64)
    rows = [torch.where(member[:, r : r + 1] > 0, v, 0.0).sum(0) for r in range(member.shape[1])]
    return torch.stack(rows).float()


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


def catdpo_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    assignment: CategoryAssignment,
    margin_table: torch.Tensor,
    signs: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    family: str = "sigmoid",
    ignore_index: int = -100,
    average_log_prob: bool = False,
    shift_labels: bool = False,
    exact_ignored: bool = True,
):
    """The whole naive loss on canonical inputs (``loss()`` builds them).

    Returns ``(per-pair loss (B,), policy_logps, ref_logps, category_stats)``.
    ``exact_ignored=False`` is the plain TRL-style loss (see ``sequence_logps``).
    """
    seq = dict(
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        shift_labels=shift_labels,
        exact_ignored=exact_ignored,
    )
    policy = sequence_logps(policy_logits, labels, **seq)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = sequence_logps(ref_logits, labels, **seq)
    ref = ref_logps.detach().to(policy.dtype)
    delta = assignment.pair_margins(margin_table).to(policy.dtype)
    loss, h, z = pair_loss(policy, ref, signs, delta, beta=beta, family=family)
    member = assignment.membership(torch.float64)
    return loss, policy, ref, category_stats(pair_stat_values(loss, h, z, beta), member)


# ------------------------------------------------------------------ the LM head, naively
def head_logits(hidden, weight, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None) -> torch.Tensor:
    """All logits ``(..., V)`` of ``hidden @ weight.T + bias``, transformed as the model's head does."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z if temperature == 1.0 else z / temperature


def packed_sequence_logps(logits, labels, cu_seqlens, **seq) -> torch.Tensor:
    """``sequence_logps`` of a packed batch: ``logits (N, V)``, ``labels (N,)``, sequences at ``cu_seqlens``."""
    bounds = cu_seqlens.tolist()
    out = [
        sequence_logps(logits[a:b].unsqueeze(0), labels[a:b].unsqueeze(0), **seq)
        if b - a > (1 if seq.get("shift_labels") else 0)
        else logits.new_zeros(1, dtype=compute_dtype(logits.dtype))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(out)


def token_metrics(logits, labels, *, ignore_index=-100, shift_labels=False) -> dict[str, torch.Tensor]:
    """Per-sequence sums over counted tokens of entropy, mean logit and top-1 hits, and the token count."""
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    z = logits.detach().to(compute_dtype(logits.dtype))
    mask = (labels != ignore_index).to(z.dtype)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (z.argmax(-1) == labels).to(z.dtype)
    return {
        "entropy": (entropy * mask).sum(-1),
        "mean_logit": (z.mean(-1) * mask).sum(-1),
        "top1": (top1 * mask).sum(-1),
        "tokens": mask.sum(-1),
    }
