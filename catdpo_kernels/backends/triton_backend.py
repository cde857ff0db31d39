"""``backend="triton"``: the fused Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

from ..ops.category_stats import category_table
from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    float64_ok = False

    def check_device(self, device):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
                "TRITON_INTERPRET=1. Use backend='torch' or 'auto' for CPU tensors."
            )

    def sequence_logps(self, policy_logits, ref_logits, labels, opts):
        from ..ops.sequence_logps_triton import policy_ref_logps_triton

        ref = None if ref_logits is None else ref_logits.detach()
        return policy_ref_logps_triton(
            policy_logits, ref, labels, inplace_backward=opts.inplace_backward, **opts.sequence_options()
        )

    def pair_terms(self, policy_logps, ref_logps, pairs, opts):
        from ..ops.pair_terms_triton import pair_terms_triton

        return pair_terms_triton(policy_logps, ref_logps, pairs, beta=opts.beta, family=opts.spec.family)

    def category_table(self, values, assignment):
        return category_table(values, assignment)

    def head_kernels(self):
        from ..ops import linear_head_triton

        return linear_head_triton
