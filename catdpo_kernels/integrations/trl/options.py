"""Which ``trl.DPOConfig`` options ``CatDPOTrainer`` honours, and which it refuses.

Every option of ``DPOConfig`` beyond ``TrainingArguments`` is in ``OPTIONS``
(a test keeps it complete as TRL grows). An option is *honoured* when the
trainer computes what TRL's own ``DPOTrainer`` computes with it; *refused*
options raise ``ValueError`` at ``__init__`` with what to do instead. None is
accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

# loss_type values CatDPOTrainer computes (TRL's names): the preference loss, plus an SFT term.
PREFERENCE_LOSSES = {"sigmoid": ("dpo", "safedpo", "catdpo"), "ipo": ("ipo",)}
EXTRA_LOSSES = ("sft",)

# option -> (status, what it does here). status: "honoured", "refused unless default", "handled by TRL".
OPTIONS = {
    "beta": ("honoured", "the DPO temperature β of every loss type"),
    "loss_type": (
        "honoured for sigmoid, ipo and sft",
        "'sigmoid' with catdpo_loss_type dpo/safedpo/catdpo; 'ipo' with catdpo_loss_type='ipo' "
        "(length-averaged log-ratios, as TRL); 'sft' as an extra term; every other loss type is refused",
    ),
    "loss_weights": ("honoured", "weights of the preference loss and the sft term"),
    "label_smoothing": (
        "honoured",
        "TRL's sigmoid, ipo and sft losses do not read it, so neither does Cat-DPO "
        "(the loss types that do are refused)",
    ),
    "router_aux_loss_coef": ("honoured", "a mixture of experts' load-balancing loss is added, as TRL adds it"),
    "precompute_ref_log_probs": ("honoured", "the reference log-probs are computed once by TRL"),
    "precompute_ref_batch_size": ("honoured", "TRL's batch size for that pass"),
    "sync_ref_model": ("honoured", "TRL's callback mixes the policy into the reference model"),
    "ref_model_mixup_alpha": ("honoured", "with sync_ref_model"),
    "ref_model_sync_steps": ("honoured", "with sync_ref_model"),
    "max_length": ("handled by TRL", "truncation in TRL's collator"),
    "truncation_mode": ("handled by TRL", "truncation in TRL's collator"),
    "pad_to_multiple_of": ("handled by TRL", "padding in TRL's collator"),
    "pad_token": ("handled by TRL", "padding in TRL's collator"),
    "padding_free": ("handled by TRL", "TRL 1.16 turns it off (with a warning) and pads"),
    "disable_dropout": ("handled by TRL", "applied to the models before training"),
    "activation_offloading": ("handled by TRL", "memory only"),
    "model_init_kwargs": ("handled by TRL", "model loading"),
    "trust_remote_code": ("handled by TRL", "model loading"),
    "dataset_num_proc": ("handled by TRL", "data preparation"),
    "ld_alpha": ("refused unless None", "LD-DPO's length desensitisation is not part of Cat-DPO"),
    "f_divergence_type": ("refused unless 'reverse_kl'", "f-DPO divergences are not part of Cat-DPO"),
    "f_alpha_divergence_coef": ("honoured", "read only by f_divergence_type='alpha_divergence', which is refused"),
    "use_weighting": ("refused unless False", "WPO weighting is not part of Cat-DPO"),
    "discopop_tau": ("honoured", "read only by loss_type='discopop', which is refused"),
}


@dataclass(frozen=True)
class LossPlan:
    """The trainer's loss: ``preference_weight · Cat-DPO loss + sft_weight · SFT`` (+ the router loss)."""

    catdpo_loss_type: str
    preference_weight: float
    sft_weight: float
    average_log_prob: bool


def plan_loss(args, catdpo_loss_type: str) -> LossPlan:
    """Check ``args`` (a ``DPOConfig``) against Cat-DPO and return the loss to compute."""
    _refuse_unsupported(args)
    types = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    weights = list(args.loss_weights) if args.loss_weights is not None else [1.0] * len(types)
    if len(weights) != len(types):
        raise ValueError(f"DPOConfig.loss_weights {weights} must have one weight per loss_type {types}")
    unknown = [t for t in types if t not in PREFERENCE_LOSSES and t not in EXTRA_LOSSES]
    if unknown:
        raise ValueError(
            f"DPOConfig.loss_type {unknown} is not supported by CatDPOTrainer: use 'sigmoid' (with "
            "catdpo_loss_type dpo/safedpo/catdpo) or 'ipo' (with catdpo_loss_type='ipo'), optionally plus 'sft'"
        )
    preference = [t for t in types if t in PREFERENCE_LOSSES]
    if len(preference) != 1:
        raise ValueError(
            f"DPOConfig.loss_type {types} must hold exactly one preference loss ('sigmoid' or 'ipo'), "
            "optionally with 'sft'"
        )
    main = preference[0]
    if catdpo_loss_type not in PREFERENCE_LOSSES[main]:
        want = "'ipo'" if main == "ipo" else "'dpo', 'safedpo' or 'catdpo'"
        other = "'ipo'" if main == "sigmoid" else "'sigmoid'"
        raise ValueError(
            f"DPOConfig.loss_type={main!r} does not match catdpo_loss_type={catdpo_loss_type!r}: pass "
            f"catdpo_loss_type={want}, or DPOConfig(loss_type={other})"
        )
    sft = sum(w for t, w in zip(types, weights) if t == "sft")
    return LossPlan(catdpo_loss_type, weights[types.index(main)], float(sft), average_log_prob=main == "ipo")


def _refuse_unsupported(args) -> None:
    if getattr(args, "ld_alpha", None) is not None:
        raise ValueError(
            f"DPOConfig.ld_alpha={args.ld_alpha} (LD-DPO) is not supported by CatDPOTrainer; leave it None"
        )
    if getattr(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        raise ValueError(
            f"DPOConfig.f_divergence_type={args.f_divergence_type!r} is not supported by CatDPOTrainer; "
            "leave it 'reverse_kl' (standard DPO)"
        )
    if getattr(args, "use_weighting", False):
        raise ValueError("DPOConfig.use_weighting=True (WPO) is not supported by CatDPOTrainer; leave it False")
