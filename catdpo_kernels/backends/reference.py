"""``backend="reference"``: the naive loss of ``catdpo_kernels.reference``, stage by stage."""

from __future__ import annotations

import torch

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def sequence_logps(self, policy_logits, ref_logits, labels, opts):
        seq = opts.sequence_options()
        policy = reference.sequence_logps(policy_logits, labels, **seq)
        if ref_logits is None:
            return policy, None
        with torch.no_grad():
            return policy, reference.sequence_logps(ref_logits, labels, **seq)

    def pair_terms(self, policy_logps, ref_logps, pairs, opts):
        delta = pairs.assignment.pair_margins(pairs.margin_table).to(policy_logps.dtype)
        loss, h, z = reference.pair_loss(
            policy_logps, ref_logps, pairs.signs, delta, beta=opts.beta, family=opts.spec.family
        )
        return loss, reference.pair_stat_values(loss, h, z, opts.beta)

    def category_table(self, values, assignment):
        return reference.category_stats(values, assignment.membership(torch.float64))
