"""Optional comparisons against other fused-loss libraries (imported lazily, skipped when absent).

Both anchors fuse the ``lm_head`` projection into the loss, so they take hidden
states and the ``lm_head`` weight, never logits. They are therefore compared in
their own group, ``lm_head``, where *every* row computes

    hidden (2B, T, D) @ weight (V, D)^T  ->  DPO-style loss  ->  grads of hidden and weight

with the reference model's hidden states and weight under ``no_grad``:

- ``lm_head+reference`` (baseline): the matmul, then the naive catdpo loss;
- ``lm_head+catdpo``: the matmul, then this package's fused loss with
  ``inplace_backward=True`` (the logits are an intermediate, nothing else reads them);
- ``liger-fused-linear-dpo``: Liger-Kernel's ``LigerFusedLinearDPOLoss``
  (``use_ref_model=True``), which chunks the matmul and computes the gradients
  during its forward (so compare ``fwd_bwd``; its ``bwd`` only scales stored
  gradients). It is plain DPO on (depending on its version) averaged
  log-probs, without per-category margins or stats;
- ``cce-dpo``: a DPO built on Cut Cross-Entropy: per-token
  ``linear_cross_entropy(..., reduction="none")`` for policy and reference,
  masked sums as sequence log-probs, then the Cat-DPO pair loss
  ``-logsigmoid(beta * h - s * margin)`` (``head_cases.catdpo_pair_loss``). CCE
  filters negligible gradient entries by default.

The fused-head mode (``catdpo-bench --head``, ``head_cases``) compares the same
two libraries, and TRL's chunked head, against ``linear_loss`` with shifted
labels, on CPU as well; this group stays for the logits mode on CUDA.

The rows of this package compute the full Cat-DPO loss (margins gathered per
category and the per-category stats table), so they do slightly more work than
the anchors. Memory ratios here exclude the returned ``hidden``/``weight``
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import LOSS_OPTIONS, Shape, Skip, Variant, make_categories, make_labels
from .head_cases import fused_backend, not_installed, pair_loss_forward, require

ANCHOR_MODULES = {"liger-fused-linear-dpo": "liger_kernel", "cce-dpo": "cut_cross_entropy"}


def availability() -> dict:
    """``{anchor label: None if importable, else why not}`` (nothing is imported)."""
    return {label: not_installed(module) for label, module in ANCHOR_MODULES.items()}


@dataclass
class HiddenInputs:
    hidden: torch.Tensor  # (2B, T, D) leaf, requires grad
    weight: torch.Tensor  # (V, D) leaf, requires grad
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    labels: torch.Tensor
    categories: torch.Tensor
    margins: torch.Tensor

    def nbytes(self) -> int:
        tensors = (
            self.hidden,
            self.weight,
            self.ref_hidden,
            self.ref_weight,
            self.labels,
            self.categories,
            self.margins,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def logits_bytes(self):
        return None  # no logits given: no bandwidth figure for this group


def make_hidden_inputs(shape: Shape, dtype, device, hidden_dim: int, *, seed: int = 0) -> HiddenInputs:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = hidden_dim**-0.5

    def randn(*size):
        return torch.randn(*size, device=device, dtype=torch.float32, generator=gen).to(dtype)

    hidden = randn(shape.rows, shape.tokens, hidden_dim).requires_grad_(True)
    weight = (randn(shape.vocab, hidden_dim) * (2 * scale)).to(dtype).requires_grad_(True)
    ref_hidden = randn(shape.rows, shape.tokens, hidden_dim)
    ref_weight = (randn(shape.vocab, hidden_dim) * (2 * scale)).to(dtype)
    labels = make_labels(shape, device, gen)
    categories, margins = make_categories(shape.rows // 2, device)
    return HiddenInputs(hidden, weight, ref_hidden, ref_weight, labels, categories, margins)


def _catdpo_lm_head(backend: str, inplace: bool):
    import catdpo_kernels

    def forward(inp: HiddenInputs):
        logits = inp.hidden @ inp.weight.t()
        with torch.no_grad():
            ref_logits = inp.ref_hidden @ inp.ref_weight.t()
        out = catdpo_kernels.loss(
            logits,
            inp.labels,
            inp.categories,
            inp.margins,
            ref_logits=ref_logits,
            backend=backend,
            inplace_backward=inplace,
            **LOSS_OPTIONS,
        )
        return out.loss, [inp.hidden, inp.weight]

    return forward


def _require(module: str, device: torch.device):
    if device.type != "cuda":
        raise Skip(f"{module} needs a CUDA device")
    require(module)


def _liger(device: torch.device):
    _require("liger_kernel", device)
    from .head_cases import liger_dpo_module

    module = liger_dpo_module()  # the same configuration as the liger-dpo row of --head

    def forward(inp: HiddenInputs):
        out = module(inp.weight, inp.hidden, inp.labels, ref_input=inp.ref_hidden, ref_weight=inp.ref_weight)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return loss, [inp.hidden, inp.weight]

    return forward


def _cce(device: torch.device):
    _require("cut_cross_entropy", device)
    from cut_cross_entropy import linear_cross_entropy

    def sequence_logps(hidden, weight, labels):
        rows, tokens, dim = hidden.shape
        nll = linear_cross_entropy(
            hidden.reshape(-1, dim), weight, labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        mask = (labels != -100).to(torch.float32)
        return -(nll.view(rows, tokens).float() * mask).sum(-1)

    return pair_loss_forward(sequence_logps)  # HiddenInputs has the fields of HeadInputs it reads


def lm_head_variants(device: torch.device) -> list[Variant]:
    fused = fused_backend(device.type)
    return [
        Variant(
            "lm_head+reference",
            "reference",
            lambda: _catdpo_lm_head("reference", False),
            group="lm_head",
            baseline=True,
        ),
        Variant(
            "lm_head+catdpo",
            fused,
            lambda: _catdpo_lm_head(fused, True),
            group="lm_head",
            inplace=True,
            notes=[f"backend={fused}, inplace_backward=True"],
        ),
        Variant("liger-fused-linear-dpo", "anchor", lambda: _liger(device), group="lm_head", replay_backward=False),
        Variant("cce-dpo", "anchor", lambda: _cce(device), group="lm_head", replay_backward=False),
    ]
