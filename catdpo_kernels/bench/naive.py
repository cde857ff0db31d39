"""The naive baseline every benchmark ratio is taken against: the plain TRL-style loss.

Upcast the whole ``(2B, T, V)`` logits to fp32, ``log_softmax``, gather, masked
sum, then the pair loss and the per-category table, exactly as
``catdpo_kernels.reference`` writes it, but without the extra masking pass the
package's own reference backend adds (which makes an ignored token's gradient
exactly 0 whatever its logits hold, at the cost of one more ``(2B, T, V)``
buffer: timing that would flatter the ratios).
"""

from __future__ import annotations

import torch

from .. import reference
from ..options import LossOptions
from ..pairs import PairInputs


def naive_loss(policy_logits, ref_logits, labels, categories, margins, **options) -> torch.Tensor:
    """The reduced naive Cat-DPO loss of logits (``options``: those of ``loss()``)."""
    opts = LossOptions(**{k: v for k, v in options.items() if k != "check_inputs"})
    pairs = PairInputs.build(
        opts.spec,
        categories,
        margins,
        opts.margin,
        None,
        num_categories=margins.shape[0],
        num_pairs=labels.shape[0] // 2,
        device=labels.device,
    )
    per_pair, _, _, _ = reference.catdpo_loss(
        policy_logits,
        labels,
        pairs.assignment,
        pairs.margin_table,
        pairs.signs,
        ref_logits=ref_logits,
        beta=opts.beta,
        family=opts.spec.family,
        exact_ignored=False,
        **opts.sequence_options(),
    )
    if opts.reduction == "sum":
        return per_pair.sum()
    return per_pair.mean()


def naive_head_loss(hidden, weight, ref_hidden, ref_weight, labels, categories, margins, **options) -> torch.Tensor:
    """``hidden @ weight.T`` (and the reference's, without autograd), then ``naive_loss``."""
    logits = hidden @ weight.t()
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.t()
    return naive_loss(logits, ref_logits, labels, categories, margins, **options)
