"""Chunked, memory-bounded sequence log-probs in plain PyTorch (``backend="torch"``).

Only one block of at most ``CHUNK_ELEMENTS`` logits is ever upcast to fp32, so
peak memory does not grow with ``(2B, T, V)``. The forward saves the fp32
log-sum-exp of every token, as a ``(max, log-sum)`` pair (see ``forward_logps``);
the backward rebuilds the softmax from it block by block and writes ``g_seq · mask · (onehot − softmax)`` straight into the
gradient (or, with ``inplace_backward``, into the logits buffer).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..reference import compute_dtype

# About 8 MiB of fp32 per block: large enough for vectorised kernels, small
# enough to stay far below the (2B, T, V) footprint of the naive path.
CHUNK_ELEMENTS = 1 << 21


def token_blocks(rows: int, tokens: int, vocab: int, budget: int | None = None) -> Iterator[tuple[slice, slice]]:
    """Cover a ``(rows, tokens)`` grid with blocks of about ``budget / vocab`` tokens.

    Short sequences are grouped several rows per block; long ones are split
    along ``T``. Works for any strides, because blocks are plain slices.
    ``budget`` defaults to the module's ``CHUNK_ELEMENTS``, read at call time
    (so tests and users can change it).
    """
    if budget is None:
        budget = CHUNK_ELEMENTS
    per_block = max(1, budget // max(vocab, 1))
    if tokens <= per_block:
        rows_per_block = max(1, per_block // max(tokens, 1))
        for r in range(0, rows, rows_per_block):
            yield slice(r, min(r + rows_per_block, rows)), slice(0, tokens)
    else:
        for r in range(rows):
            for t in range(0, tokens, per_block):
                yield slice(r, r + 1), slice(t, min(t + per_block, tokens))


def _aligned(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool):
    """Views of logits and labels that line up token for token (no copy)."""
    if shift_labels:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def _targets(labels: torch.Tensor, ignore_index: int, vocab: int):
    """Mask of counted tokens, gather-safe labels and a NaN poison for bad labels."""
    mask = labels != ignore_index
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(mask & valid, labels, torch.zeros_like(labels))
    return mask, safe, mask & ~valid


def forward_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    average_log_prob: bool,
    shift_labels: bool,
    save_lse: bool,
):
    """Returns ``(logps (N,), lse or None, token counts (N,))`` in the compute dtype.

    ``lse`` is the pair ``(max, log-sum)`` of per-token ``(N, T')`` tensors with
    ``logsumexp = max + log-sum``. They are kept apart on purpose: rounding
    ``max + log-sum`` to one fp32 number costs up to half an ulp of ``|max|``
    (about 2e-6 at logits of 50), which then shows in every token log-prob and
    every softmax entry. ``(x − max) − log-sum`` is what ``log_softmax`` computes,
    so the naive path's accuracy is matched.
    """
    x_all, y_all = _aligned(logits, labels, shift_labels)
    rows, tokens, vocab = x_all.shape
    acc = compute_dtype(logits.dtype)
    mask, safe, bad = _targets(y_all, ignore_index, vocab)
    sums = torch.zeros(rows, device=logits.device, dtype=acc)
    if save_lse:
        max_all = torch.empty(rows, tokens, device=logits.device, dtype=acc)
        logsum_all = torch.empty(rows, tokens, device=logits.device, dtype=acc)
    for rs, ts in token_blocks(rows, tokens, vocab):
        x = x_all[rs, ts].to(acc)  # a view for fp32/fp64 logits, a copy for half types
        top = x.amax(-1, keepdim=True)
        z = x - top  # the one block-sized fp32 buffer
        del x
        tok = z.gather(-1, safe[rs, ts].unsqueeze(-1)).squeeze(-1)
        logsum = z.exp_().sum(-1).log_()
        del z
        tok = torch.where(mask[rs, ts], tok - logsum, torch.zeros_like(tok))
        sums[rs] += tok.sum(-1)
        if save_lse:
            max_all[rs, ts] = top.squeeze(-1)
            logsum_all[rs, ts] = logsum
    # A label outside [0, V) that is not ignore_index poisons its sequence.
    sums = torch.where(bad.any(-1), torch.full_like(sums, float("nan")), sums)
    counts = mask.sum(-1)
    if average_log_prob:
        sums = sums / counts.clamp(min=1).to(acc)
    return sums, ((max_all, logsum_all) if save_lse else None), counts


def backward_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor],
    g_seq: torch.Tensor,
    *,
    ignore_index: int,
    shift_labels: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``g_seq · mask · (onehot − softmax)`` into ``out`` (may alias ``logits``).

    ``lse`` is the ``(max, log-sum)`` pair saved by ``forward_logps``.
    """
    max_all, logsum_all = lse
    x_all, y_all = _aligned(logits, labels, shift_labels)
    g_all, _ = _aligned(out, labels, shift_labels)
    rows, tokens, vocab = x_all.shape
    acc = max_all.dtype
    mask, safe, _ = _targets(y_all, ignore_index, vocab)
    g_tok_all = g_seq.to(acc).unsqueeze(1) * mask.to(acc)
    for rs, ts in token_blocks(rows, tokens, vocab):
        x = x_all[rs, ts]
        g_tok = g_tok_all[rs, ts].unsqueeze(-1)
        # For fp32/fp64 logits x.to(acc) aliases the logits: write into a fresh
        # buffer unless the caller asked for the in-place backward.
        p = x.to(acc, copy=not (out is logits))
        p.sub_(max_all[rs, ts].unsqueeze(-1)).sub_(logsum_all[rs, ts].unsqueeze(-1)).exp_().mul_(-g_tok)
        # The target entry in fp32: g·(1 − p), folded in as −g·p + g.
        p.scatter_add_(-1, safe[rs, ts].unsqueeze(-1), g_tok)
        if p.data_ptr() != g_all[rs, ts].data_ptr():
            g_all[rs, ts] = p
        del p
    if shift_labels:
        out[:, -1].zero_()
    return out


class SequenceLogpsTorch(torch.autograd.Function):
    """``(2B, T, V)`` logits -> ``(2B,)`` sequence log-probs, gradients to the logits only."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, average_log_prob: bool, shift_labels: bool, inplace_backward: bool):
        logps, lse, counts = forward_logps(
            logits,
            labels,
            ignore_index=ignore_index,
            average_log_prob=average_log_prob,
            shift_labels=shift_labels,
            save_lse=True,
        )
        ctx.save_for_backward(logits, labels, *lse, counts)
        ctx.opts = (ignore_index, average_log_prob, shift_labels, inplace_backward)
        ctx.mark_non_differentiable(counts)
        return logps, counts

    @staticmethod
    def backward(ctx, grad_logps, _grad_counts):
        logits, labels, top, logsum, counts = ctx.saved_tensors
        ignore_index, average_log_prob, shift_labels, inplace_backward = ctx.opts
        g_seq = grad_logps.to(top.dtype)
        if average_log_prob:
            g_seq = g_seq / counts.clamp(min=1).to(top.dtype)
        out = logits if inplace_backward else torch.empty_like(logits)
        backward_logits(
            logits, labels, (top, logsum), g_seq, ignore_index=ignore_index, shift_labels=shift_labels, out=out
        )
        return out, None, None, None, None, None


def sequence_logps_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    average_log_prob: bool,
    shift_labels: bool,
    inplace_backward: bool = False,
    requires_grad: bool = True,
) -> torch.Tensor:
    """Sequence log-probs ``(N,)`` in fp32 (fp64 for fp64 logits)."""
    if requires_grad and logits.requires_grad and torch.is_grad_enabled():
        logps, _ = SequenceLogpsTorch.apply(logits, labels, ignore_index, average_log_prob, shift_labels, inplace_backward)
        return logps
    with torch.no_grad():
        logps, _, _ = forward_logps(
            logits,
            labels,
            ignore_index=ignore_index,
            average_log_prob=average_log_prob,
            shift_labels=shift_labels,
            save_lse=False,
        )
    return logps


def policy_ref_logps_torch(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    average_log_prob: bool,
    shift_labels: bool,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Policy log-probs (with autograd) and, if given, reference log-probs (without)."""
    seq = dict(ignore_index=ignore_index, average_log_prob=average_log_prob, shift_labels=shift_labels)
    policy = sequence_logps_torch(policy_logits, labels, inplace_backward=inplace_backward, **seq)
    ref = None if ref_logits is None else sequence_logps_torch(ref_logits, labels, requires_grad=False, **seq)
    return policy, ref
