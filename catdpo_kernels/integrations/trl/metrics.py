"""The metrics TRL's ``DPOTrainer`` logs, under its names and with its values.

Rewards and log-probs are sums over the completion, whatever averaging the loss
uses (IPO averages). Entropy, the mean logits and the token accuracy come from
the fused head's ``HeadMetrics`` (or, with logits, from the logits), so no
logits are built for them.
"""

from __future__ import annotations

import torch

from ... import reference
from ...head import HeadMetrics


def logits_metrics(logits: torch.Tensor, labels: torch.Tensor) -> HeadMetrics:
    """``HeadMetrics`` of full logits (the ``head="logits"`` path), without autograd."""
    with torch.no_grad():
        m = reference.token_metrics(logits, labels, shift_labels=True)
    return HeadMetrics(*(m[k].float() for k in ("entropy", "mean_logit", "top1", "tokens")))


def log_step(trainer, mode: str, *, policy_sums, ref_sums, head: HeadMetrics, attention_mask, aux_loss=None) -> None:
    """Append one micro-batch's TRL metrics to ``trainer._metrics[mode]``."""
    gather = trainer.accelerator.gather_for_metrics
    m = trainer._metrics[mode]
    b = policy_sums.shape[0] // 2
    policy_sums, ref_sums = policy_sums.detach().float(), ref_sums.detach().float()
    chosen = trainer.beta * (policy_sums[:b] - ref_sums[:b])
    rejected = trainer.beta * (policy_sums[b:] - ref_sums[b:])
    g_chosen, g_rejected = gather(chosen), gather(rejected)
    m["rewards/chosen"].append(g_chosen.mean().item())
    m["rewards/rejected"].append(g_rejected.mean().item())
    m["rewards/accuracies"].append((g_chosen > g_rejected).float().mean().item())
    m["rewards/margins"].append((g_chosen - g_rejected).mean().item())
    m["logps/chosen"].append(gather(policy_sums[:b]).mean().item())
    m["logps/rejected"].append(gather(policy_sums[b:]).mean().item())

    def ratio(num, den) -> float:
        num, den = gather(num.reshape(1)).sum(), gather(den.reshape(1)).sum()
        return (num / den).item() if den > 0 else 0.0

    tokens = head.tokens
    m["entropy"].append(ratio(head.entropy.sum(), tokens.sum()))
    m["logits/chosen"].append(ratio(head.mean_logit[:b].sum(), tokens[:b].sum()))
    m["logits/rejected"].append(ratio(head.mean_logit[b:].sum(), tokens[b:].sum()))
    m["mean_token_accuracy"].append(ratio(head.top1[:b].sum(), tokens[:b].sum()))
    if mode == "train":
        trainer._total_train_tokens += gather(attention_mask.sum()).sum().item() // getattr(trainer, "_tp_size", 1)
    m["num_tokens"] = [trainer._total_train_tokens]
    if aux_loss is not None:
        m["aux_loss"].append(gather(aux_loss.detach()).mean().item())
