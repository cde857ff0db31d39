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

    def linear_loss(self, call, pairs, opts):
        """The naive fused-head baseline: all logits ``hidden @ weight.T``, then the naive loss."""
        from ..functional import pair_stage
        from ..head import HeadMetrics

        seq = opts.sequence_options()
        t = call.transform
        tf = dict(temperature=t.temperature, logit_scale=t.logit_scale, softcap=t.softcap)

        # Rows no token is scored from are zeroed first, so that whatever they hold (NaN/inf)
        # their gradient, and their share of the weight gradient, is exactly 0.
        counted = torch.zeros(call.layout.num_rows, dtype=torch.bool, device=call.labels.device)
        counted[call.layout.hidden_index] = True

        def logps(side, labels):
            hidden = torch.where(counted.unsqueeze(-1), side.hidden_rows, 0.0)
            logits = reference.head_logits(hidden, side.weight, side.bias, **tf)
            if call.cu_seqlens is None:
                logits = logits.view(*call.labels.shape, -1)
                return reference.sequence_logps(logits, labels, **seq), logits
            return reference.packed_sequence_logps(logits, labels, call.cu_seqlens, **seq), logits

        policy, logits = logps(call.policy, call.labels)
        if call.ref_logps is not None:
            ref = call.ref_logps.detach()
        else:
            with torch.no_grad():
                ref, _ = logps(call.ref, call.labels)
        metrics = None
        if call.want_metrics:
            if call.cu_seqlens is None:
                m = reference.token_metrics(
                    logits, call.labels, ignore_index=opts.ignore_index, shift_labels=opts.shift_labels
                )
            else:
                parts = [
                    reference.token_metrics(
                        logits[a:b].unsqueeze(0),
                        call.labels[a:b].unsqueeze(0),
                        ignore_index=opts.ignore_index,
                        shift_labels=opts.shift_labels,
                    )
                    for a, b in zip(call.cu_seqlens.tolist()[:-1], call.cu_seqlens.tolist()[1:])
                ]
                m = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            metrics = HeadMetrics(*(m[k].float() for k in ("entropy", "mean_logit", "top1", "tokens")))
        return pair_stage(self, policy, ref.to(policy.dtype), pairs, opts), metrics
