"""``backend="torch"``: chunked, memory-bounded sequence log-probs on any device."""

from __future__ import annotations

from ..ops.category_stats import category_table
from ..ops.pair_terms_torch import pair_terms_torch
from ..ops.sequence_logps_torch import sequence_logps_torch
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def sequence_logps(self, policy_logits, ref_logits, labels, opts):
        seq = opts.sequence_options()
        policy = sequence_logps_torch(policy_logits, labels, inplace_backward=opts.inplace_backward, **seq)
        if ref_logits is None:
            return policy, None
        return policy, sequence_logps_torch(ref_logits, labels, requires_grad=False, **seq)

    def pair_terms(self, policy_logps, ref_logps, pairs, opts):
        return pair_terms_torch(policy_logps, ref_logps, pairs, beta=opts.beta, family=opts.spec.family)

    def category_table(self, values, assignment):
        return category_table(values, assignment)

    def head_kernels(self):
        from ..ops import linear_head_torch

        return linear_head_torch
