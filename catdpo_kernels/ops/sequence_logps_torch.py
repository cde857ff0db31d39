"""Chunked, memory-bounded sequence log-probs in plain PyTorch (``backend="torch"``).

Only one block of at most ``CHUNK_ELEMENTS`` logits is ever upcast to fp32, so
peak memory does not grow with ``(2B, T, V)``. The forward runs one fused
``log_softmax`` per block; the backward recomputes the block's softmax the same
way and writes ``g_seq · mask · (onehot − softmax)`` straight into the gradient
(or, with ``inplace_backward``, into the logits buffer). On a CPU the blocks are
spread over worker threads, one intra-op thread each (``cpu_parallel``), which
keeps the path fast when another process holds one of the cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cpu_parallel import block_workers, for_each_block
from .first_order import first_order


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for half types and fp32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _run_blocks(fn, rows: int, tokens: int, vocab: int, device: torch.device) -> None:
    """``fn(rows slice, tokens slice)`` over the grid; on a CPU, blocks of ``1 / workers`` of the budget
    spread over the workers (``cpu_parallel``), so that the blocks in flight hold one budget together."""
    workers = block_workers(device)
    budget = max(1, CHUNK_ELEMENTS // workers)
    for_each_block(fn, list(token_blocks(rows, tokens, vocab, budget)), workers)


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
):
    """Returns ``(logps (N,), token counts (N,))``, logps in the compute dtype.

    Each block goes through one fused ``log_softmax`` (upcasting inside the op for
    half types), so there is one block-sized fp32 buffer and the accuracy is the
    naive path's.
    """
    x_all, y_all = _aligned(logits, labels, shift_labels)
    rows, tokens, vocab = x_all.shape
    acc = compute_dtype(logits.dtype)
    mask, safe, bad = _targets(y_all, ignore_index, vocab)
    tok_all = torch.empty(rows, tokens, device=logits.device, dtype=acc)

    def block(rs, ts):
        logp = torch.log_softmax(x_all[rs, ts], dim=-1, dtype=acc)
        tok_all[rs, ts] = logp.gather(-1, safe[rs, ts].unsqueeze(-1)).squeeze(-1)

    _run_blocks(block, rows, tokens, vocab, logits.device)
    tok_all = torch.where(mask, tok_all, torch.zeros((), dtype=acc, device=logits.device))
    sums = tok_all.sum(-1)
    # A label outside [0, V) that is not ignore_index poisons its sequence.
    sums = torch.where(bad.any(-1), torch.full_like(sums, float("nan")), sums)
    counts = mask.sum(-1)
    if average_log_prob:
        sums = sums / counts.clamp(min=1).to(acc)
    return sums, counts


def backward_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    g_seq: torch.Tensor,
    *,
    ignore_index: int,
    shift_labels: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``g_seq · mask · (onehot − softmax)`` into ``out`` (may alias ``logits``).

    The softmax of each block is recomputed by one fused op rather than rebuilt
    from saved statistics: no (2B, T) state to keep, the naive path's accuracy,
    and fewer passes over the block.
    """
    x_all, y_all = _aligned(logits, labels, shift_labels)
    g_all, _ = _aligned(out, labels, shift_labels)
    rows, tokens, vocab = x_all.shape
    acc = g_seq.dtype
    mask, safe, _ = _targets(y_all, ignore_index, vocab)
    # where, not a product: a NaN g_seq must still leave ignored tokens at exactly 0.
    g_tok_all = torch.where(mask, g_seq.unsqueeze(1), torch.zeros((), dtype=acc, device=g_seq.device))
    direct = out.dtype == acc  # fp32/fp64 gradients are written in place, no staging buffer

    def block(rs, ts):
        g_tok = g_tok_all[rs, ts].unsqueeze(-1)
        p = torch.softmax(x_all[rs, ts], dim=-1, dtype=acc)
        # An ignored token's gradient is exactly 0 whatever its logits hold (NaN·0 would be NaN).
        p.masked_fill_(~mask[rs, ts].unsqueeze(-1), 0.0)
        dest = g_all[rs, ts]
        if direct:
            torch.mul(p, g_tok.neg(), out=dest)
        else:
            p.mul_(g_tok.neg())
        target = dest if direct else p
        # The target entry in fp32: g·(1 − p), folded in as −g·p + g.
        target.scatter_add_(-1, safe[rs, ts].unsqueeze(-1), g_tok)
        if not direct:
            dest.copy_(p)

    _run_blocks(block, rows, tokens, vocab, logits.device)
    if shift_labels:
        out[:, -1].zero_()
    return out


class SequenceLogpsTorch(torch.autograd.Function):
    """``(2B, T, V)`` logits -> ``(2B,)`` sequence log-probs, gradients to the logits only."""

    @staticmethod
    def forward(
        ctx, logits, labels, ignore_index: int, average_log_prob: bool, shift_labels: bool, inplace_backward: bool
    ):
        logps, counts = forward_logps(
            logits, labels, ignore_index=ignore_index, average_log_prob=average_log_prob, shift_labels=shift_labels
        )
        ctx.save_for_backward(logits, labels, counts)
        ctx.opts = (ignore_index, average_log_prob, shift_labels, inplace_backward)
        ctx.mark_non_differentiable(counts)
        return logps, counts

    @staticmethod
    @first_order
    def backward(ctx, grad_logps, _grad_counts):
        logits, labels, counts = ctx.saved_tensors
        ignore_index, average_log_prob, shift_labels, inplace_backward = ctx.opts
        acc = compute_dtype(logits.dtype)
        g_seq = grad_logps.to(acc)
        if average_log_prob:
            g_seq = g_seq / counts.clamp(min=1).to(acc)
        out = logits if inplace_backward else torch.empty_like(logits)
        backward_logits(logits, labels, g_seq, ignore_index=ignore_index, shift_labels=shift_labels, out=out)
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
        logps, _ = SequenceLogpsTorch.apply(
            logits, labels, ignore_index, average_log_prob, shift_labels, inplace_backward
        )
        return logps
    with torch.no_grad():
        logps, _ = forward_logps(
            logits, labels, ignore_index=ignore_index, average_log_prob=average_log_prob, shift_labels=shift_labels
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
