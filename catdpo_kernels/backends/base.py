"""The interface every backend implements: three stages, one options object.

A call of ``loss()`` runs, on one backend:

1. ``sequence_logps``: policy (and reference) logits -> ``(2B,)`` sequence log-probs;
2. ``pair_terms``: log-probs + ``PairInputs`` -> per-pair loss ``(B,)`` and stats rows ``(B, K)``;
3. ``category_table``: stats rows -> the ``(C+1, K)`` table.

``linear_loss()`` (hidden states in, no logits) runs ``Backend.linear_loss``, which
the fused backends implement with their ``head_kernels()`` tile kernels and the
shared schedule of ``catdpo_kernels.fused_head``; the reference backend builds all
logits, as a naive training step would.

The reduction (``mean``, ``sum``, ``none``, ``category_mean``) is shared and
lives in ``catdpo_kernels.functional``.
"""

from __future__ import annotations

import torch

from ..categories import CategoryAssignment
from ..options import LossOptions
from ..pairs import PairInputs


class Backend:
    name: str = ""
    float64_ok: bool = True
    """Whether float64 logits are accepted (the Triton kernels take fp32/bf16/fp16 only)."""

    def check_device(self, device: torch.device) -> None:
        """Raise ``ValueError`` when this backend cannot run on ``device``."""

    def sequence_logps(
        self, policy_logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(policy_logps (2B,), ref_logps (2B,) or None)``; only the policy carries a gradient."""
        raise NotImplementedError

    def pair_terms(
        self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, pairs: PairInputs, opts: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (B,), stats rows (B, K) fp32)``; the loss is differentiable in ``policy_logps``."""
        raise NotImplementedError

    def category_table(self, values: torch.Tensor, assignment: CategoryAssignment) -> torch.Tensor:
        """``(C+1, K)`` fp32 sums of ``values`` per stats row."""
        raise NotImplementedError

    def head_kernels(self):
        """The module of fused-head tile kernels (see ``catdpo_kernels.fused_head``)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused LM head")

    def linear_loss(self, call, pairs: PairInputs, opts: LossOptions):
        """``linear_loss()`` on canonical inputs: ``(LossOutput, HeadMetrics or None)``."""
        from ..fused_head import fused_linear_loss

        return fused_linear_loss(self, call, pairs, opts)

    def __repr__(self) -> str:
        return f"<catdpo_kernels backend {self.name!r}>"
