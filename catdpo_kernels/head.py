"""The fused LM head's inputs: which hidden rows are projected, and how a logit is transformed.

``TokenLayout`` flattens a padded ``(2B, T, H)`` batch or a packed ``(N, H)``
batch with ``cu_seqlens`` into the *counted* tokens only: the hidden row each one
reads, the label it is scored against, and the sequence it belongs to. Tokens
stay in sequence order, so each sequence is one contiguous range
``[offsets[s], offsets[s+1])``. Building it costs the one host sync of the fused
head: the per-sequence token counts, which size every buffer and tile.

``HeadTransform`` is what real output heads do to a logit before the softmax:
``logit_scale`` (Cohere), ``final_logit_softcapping`` (Gemma: ``c·tanh(z/c)``)
and a sampling ``temperature`` (divide).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Default working-memory budget of the fused head (logits tiles and per-chunk
# accumulators), per device type. It never grows with B or T.
DEFAULT_BUDGET_BYTES = {"cuda": 256 << 20, "cpu": 128 << 20}


@dataclass(frozen=True)
class HeadTransform:
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        for name in ("temperature", "logit_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.softcap is not None:
            c = self.softcap
            if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (math.isfinite(c) and c > 0):
                raise ValueError(f"final_logit_softcapping must be None or a finite number > 0, got {c!r}")
            object.__setattr__(self, "softcap", float(c))

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.logit_scale == 1.0 and self.softcap is None

    def apply_(self, tile: torch.Tensor) -> torch.Tensor:
        """``tile ← transform(tile)`` in place: scale, soft-cap, then divide by the temperature."""
        if self.identity:
            return tile
        if self.logit_scale != 1.0:
            tile.mul_(self.logit_scale)
        if self.softcap is not None:
            tile.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            tile.div_(self.temperature)
        return tile

    def chain_grad_(self, grad: torch.Tensor, transformed: torch.Tensor | None) -> torch.Tensor:
        """``grad ← grad · ∂transform/∂raw`` in place; ``transformed`` holds the transformed logits
        (needed only with a soft-cap: ``∂(c·tanh(y/c))/∂y = 1 − (tanh)²``)."""
        factor = self.logit_scale / self.temperature
        if self.softcap is not None:
            t = transformed * (self.temperature / self.softcap)  # tanh(y/c)
            grad.mul_(t.mul_(t).neg_().add_(1.0))
        if factor != 1.0:
            grad.mul_(factor)
        return grad


@dataclass(frozen=True)
class TokenLayout:
    """The counted tokens of ``2B`` sequences, flattened in sequence order."""

    num_sequences: int
    num_tokens: int
    """``N``: counted tokens in total (a host int)."""
    offsets: tuple[int, ...]
    """``(2B + 1,)`` host offsets: sequence ``s`` owns tokens ``[offsets[s], offsets[s+1])``."""
    hidden_index: torch.Tensor
    """``(N,)`` int64: the row of ``hidden.reshape(-1, H)`` each counted token reads."""
    targets: torch.Tensor
    """``(N,)`` int64 labels, made safe to index (an out-of-range label reads 0)."""
    seq_ids: torch.Tensor
    """``(N,)`` int64 sequence of each counted token."""
    counts: torch.Tensor
    """``(2B,)`` int64 counted tokens per sequence (on the device)."""
    bad: torch.Tensor
    """``(2B,)`` bool: sequences with a label outside ``[0, V)`` (their log-prob is NaN)."""
    num_rows: int
    """Rows of ``hidden.reshape(-1, H)`` (to scatter the gradient back)."""

    @classmethod
    def padded(cls, labels: torch.Tensor, *, ignore_index: int, shift: bool, vocab: int) -> TokenLayout:
        """``labels (2B, T)``; with ``shift`` position ``t`` is scored against ``labels[:, t + 1]``."""
        rows, tokens = labels.shape
        scored = labels[:, 1:] if shift else labels
        width = scored.shape[1]
        mask = scored != ignore_index
        positions = torch.arange(rows * tokens, device=labels.device).view(rows, tokens)[:, :width]
        return cls._from_mask(mask, scored, positions, rows, rows * tokens, vocab)

    @classmethod
    def packed(
        cls, labels: torch.Tensor, cu_seqlens: torch.Tensor, *, ignore_index: int, shift: bool, vocab: int
    ) -> TokenLayout:
        """``labels (N_all,)`` with sequences ``[cu_seqlens[s], cu_seqlens[s+1])``; ``shift`` stays
        within each sequence (its last position scores nothing)."""
        n_all = labels.shape[0]
        bounds = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        num_seq = bounds.shape[0] - 1
        pos = torch.arange(n_all, device=labels.device)
        seq_of = torch.searchsorted(bounds[1:], pos, right=True)
        if shift:
            nxt = torch.clamp(pos + 1, max=max(n_all - 1, 0))
            last = pos + 1 >= bounds[1:][seq_of]
            scored = torch.where(last, ignore_index, labels[nxt])
        else:
            scored = labels
        mask = scored != ignore_index
        return cls._from_mask_flat(mask, scored, pos, seq_of, num_seq, n_all, vocab)

    @classmethod
    def _from_mask(cls, mask, scored, positions, rows, num_rows, vocab):
        seq_of = torch.arange(rows, device=mask.device).unsqueeze(1).expand_as(mask)
        return cls._from_mask_flat(
            mask.reshape(-1), scored.reshape(-1), positions.reshape(-1), seq_of.reshape(-1), rows, num_rows, vocab
        )

    @classmethod
    def _from_mask_flat(cls, mask, scored, positions, seq_of, num_seq, num_rows, vocab):
        counts = torch.zeros(num_seq, device=mask.device, dtype=torch.int64).index_add_(0, seq_of, mask.long())
        # The one host sync: every buffer size and tile boundary follows from these counts.
        host_counts = counts.tolist()
        offsets = [0]
        for c in host_counts:
            offsets.append(offsets[-1] + c)
        n = offsets[-1]
        # Compact the counted positions without another sync: scatter each one to
        # its rank; uncounted positions all go to a discarded slot n.
        rank = torch.cumsum(mask.long(), 0) - 1
        slot = torch.where(mask, rank, n)
        hidden_index = torch.empty(n + 1, device=mask.device, dtype=torch.int64).scatter_(0, slot, positions)[:n]
        labels_c = torch.empty(n + 1, device=mask.device, dtype=torch.int64).scatter_(0, slot, scored.long())[:n]
        seq_ids = torch.empty(n + 1, device=mask.device, dtype=torch.int64).scatter_(0, slot, seq_of)[:n]
        out_of_range = (labels_c < 0) | (labels_c >= vocab)
        bad = (
            torch.zeros(num_seq, device=mask.device, dtype=torch.int64).index_add_(0, seq_ids, out_of_range.long()) > 0
        )
        targets = torch.where(out_of_range, 0, labels_c)
        return cls(num_seq, n, tuple(offsets), hidden_index, targets, seq_ids, counts, bad, num_rows)

    def sequence_sums(self, per_token: torch.Tensor) -> torch.Tensor:
        """``(2B,)`` float64 sums of a ``(N,)`` per-token quantity over each sequence, in a fixed order."""
        cs = torch.cat([per_token.new_zeros(1, dtype=torch.float64), torch.cumsum(per_token.double(), 0)])
        off = torch.tensor(self.offsets, device=per_token.device)
        return cs[off[1:]] - cs[off[:-1]]


class HeadMetrics(NamedTuple):
    """Per-sequence sums of per-token quantities from the fused head's pass (``return_metrics=True``).

    Means over tokens are ``sum / tokens``; everything is detached. The logits
    are the transformed ones (after scale, soft-cap and temperature).
    """

    entropy: torch.Tensor
    """``(2B,)`` Σ over counted tokens of the softmax entropy ``−Σ_v p_v log p_v``."""
    mean_logit: torch.Tensor
    """``(2B,)`` Σ over counted tokens of the mean logit over the vocabulary."""
    top1: torch.Tensor
    """``(2B,)`` number of counted tokens whose label is the argmax (the first one on ties)."""
    tokens: torch.Tensor
    """``(2B,)`` number of counted tokens."""


@dataclass
class HeadPlan:
    """How one fused-head call runs: its tokens, tile size, schedule and the pair gradient.

    ``groups`` (one-pass schedule) lists ``[i0, i1)`` pair ranges whose counted
    tokens fit one tile together; ``None`` means the two-pass schedule.
    ``pair_grad(policy_logps_group, i0, i1)`` returns ``∂(reduced loss)/∂π`` for
    the ``2k`` sequences of the group (chosen ones first).
    """

    layout: TokenLayout
    transform: HeadTransform
    average: bool
    rows_per_tile: int
    compute_dtype: torch.dtype
    kernels: object = None
    """The backend's tile-kernel module (``score_tokens``, ``backward_tiles``, ...)."""
    groups: list[tuple[int, int]] | None = None
    pair_grad: Callable | None = None
    finish: Callable | None = None
    want_metrics: bool = False
    metrics: dict | None = None
    result: object = None

    def new_metrics(self) -> dict | None:
        if not self.want_metrics:
            return None
        n, dev = self.layout.num_tokens, self.layout.targets.device
        acc = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        return {name: torch.zeros(n, dtype=acc, device=dev) for name in ("entropy", "mean_logit", "top1")}

    def sequence_metrics(self) -> HeadMetrics | None:
        if self.metrics is None:
            return None
        sums = {k: self.layout.sequence_sums(v).float() for k, v in self.metrics.items()}
        return HeadMetrics(sums["entropy"], sums["mean_logit"], sums["top1"], self.layout.counts.float())


def pair_groups(layout: TokenLayout, rows_per_tile: int) -> list[tuple[int, int]] | None:
    """Consecutive pairs whose counted tokens (chosen + rejected) fit one tile; ``None`` if one pair alone does not."""
    b = layout.num_sequences // 2
    off = layout.offsets
    sizes = [(off[i + 1] - off[i]) + (off[b + i + 1] - off[b + i]) for i in range(b)]
    if any(s > rows_per_tile for s in sizes):
        return None
    groups, start, used = [], 0, 0
    for i, s in enumerate(sizes):
        if used + s > rows_per_tile and i > start:
            groups.append((start, i))
            start, used = i, 0
        used += s
    groups.append((start, b))
    return groups
