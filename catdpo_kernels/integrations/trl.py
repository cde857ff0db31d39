"""``CatDPOTrainer``: TRL's ``DPOTrainer`` (1.x) with the Cat-DPO loss of ``catdpo_kernels``.

Tested with trl 1.16.0 and transformers 5.24 (the ``[trl]`` extra pins
``trl>=1.16,<2``). Install with ``pip install "catdpo_kernels[trl]"``.

What changes relative to ``trl.DPOTrainer``:

* the data set carries two more columns next to ``prompt`` / ``chosen`` /
  ``rejected``: ``category`` (an int id in ``[-1, C)``, or a multi-hot list of
  ``C`` bools) and, optionally, ``unsafe`` (``[h_chosen, h_rejected]``, 0/1;
  without it ``s = 1`` for pairs with a category). ``catdpo_kernels.data.pairs_to_dataset``
  builds such a data set from PKU-SafeRLHF rows;
* the collator (:class:`CatDPOCollator`) wraps TRL's and adds ``category`` and
  ``unsafe`` tensors in the row convention (``unsafe`` is ``(2B,)``, chosen rows first);
* ``compute_loss`` runs the policy forward for logits and calls
  ``catdpo_kernels.loss(..., shift_labels=True)``; the reference log-probs come
  from TRL (``ref_model``, the PEFT adapter switch, or ``precompute_ref_log_probs``);
* the trainer owns a :class:`~catdpo_kernels.CategoryMargins`: the category stats
  of every training micro-batch are summed and fed to ``margins.update`` once per
  optimiser step (``on_step_end``), which all-reduces them across ranks;
* the value checks of ``catdpo_kernels.loss`` (a host sync) run on the first batch
  only; a later out-of-range label or category shows as a NaN loss, which
  ``margins.update`` then refuses ("stats must be finite");
* per-category metrics (``catdpo/margin/<name>``, ``catdpo/unsafe_rate/<name>``,
  and ``eval_catdpo/unsafe_rate/<name>`` after an evaluation) go to the logs; the
  margins are saved with every checkpoint (``catdpo_margins.pt``) and restored
  on ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "catdpo_kernels.integrations.trl needs TRL 1.x: pip install \"catdpo_kernels[trl]\" (trl>=1.16,<2)"
    ) from e

from ..constants import LOSS_TYPES, STAT_INDEX
from ..loss import loss as catdpo_loss
from ..margins import CategoryMargins

MARGINS_FILE = "catdpo_margins.pt"
_TRL_INPUT_KEYS = ("input_ids", "attention_mask", "completion_mask")


class CatDPOCollator:
    """Wraps TRL's preference collator: adds ``category`` ((B,) int64 or (B, C) bool) and
    ``unsafe`` ((2B,) int64, chosen rows first) from the examples' columns."""

    def __init__(self, base: Callable[[list[dict]], dict]):
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base(examples)
        if "category" in examples[0]:
            cats = [ex["category"] for ex in examples]
            if isinstance(cats[0], (list, tuple)):
                out["category"] = torch.tensor([[bool(v) for v in c] for c in cats], dtype=torch.bool)
            else:
                out["category"] = torch.tensor([int(c) for c in cats], dtype=torch.long)
        if "unsafe" in examples[0]:
            pairs = torch.tensor([[int(v) for v in ex["unsafe"]] for ex in examples], dtype=torch.long)
            out["unsafe"] = torch.cat([pairs[:, 0], pairs[:, 1]])
        return out


class _MarginUpdateCallback(TrainerCallback):
    """Feeds the stats summed over an optimiser step's micro-batches to the margins, once."""

    def __init__(self, trainer: CatDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_margins()
        return control


class CatDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is ``catdpo_kernels.loss``.

    Args (on top of ``DPOTrainer``'s; ``args.beta`` is the β):
        margins: the ``CategoryMargins`` to own. Default: ``CategoryMargins(num_categories,
            names=category_names, **margin_kwargs)``, or the PKU-SafeRLHF margins when neither
            is given.
        num_categories / category_names: ``C`` and the names, when ``margins`` is not given.
        catdpo_loss_type: ``catdpo`` (default), ``safedpo``, ``dpo`` or ``ipo``.
        safedpo_margin: SafeDPO's global margin (``catdpo_loss_type="safedpo"``).
        backend: ``catdpo_kernels`` backend (``auto``: Triton on CUDA, torch elsewhere).
        average_log_prob, reduction: passed to ``catdpo_kernels.loss``.
        margin_kwargs: ``CategoryMargins`` options (``init``, ``lr``, ``target``, ...).
    """

    _tag_names = ["trl", "dpo", "catdpo"]
    _name = "CatDPO"

    def __init__(
        self,
        *args,
        margins: CategoryMargins | None = None,
        num_categories: int | None = None,
        category_names: Sequence[str] | None = None,
        catdpo_loss_type: str = "catdpo",
        safedpo_margin: float = 0.0,
        backend: str = "auto",
        average_log_prob: bool = False,
        reduction: str = "mean",
        margin_kwargs: dict | None = None,
        **kwargs,
    ):
        if catdpo_loss_type not in LOSS_TYPES:
            raise ValueError(f"catdpo_loss_type must be one of {LOSS_TYPES}, got {catdpo_loss_type!r}")
        if margins is None:
            if num_categories is None and category_names is None:
                margins = CategoryMargins.for_pku_saferlhf(**(margin_kwargs or {}))
            else:
                c = num_categories if num_categories is not None else len(category_names)
                margins = CategoryMargins(c, names=category_names, **(margin_kwargs or {}))
        elif margin_kwargs:
            raise TypeError("pass either margins= or margin_kwargs=, not both")
        self.margins = margins
        self.catdpo_loss_type = catdpo_loss_type
        self.safedpo_margin = float(safedpo_margin)
        self.catdpo_backend = backend
        self.average_log_prob = average_log_prob
        self.catdpo_reduction = reduction
        self._pending_stats: torch.Tensor | None = None
        self._eval_stats: torch.Tensor | None = None
        self._checked_inputs = False
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, CatDPOCollator):
            self.data_collator = CatDPOCollator(self.data_collator)
        self.margins.to(self.accelerator.device)
        self.add_callback(_MarginUpdateCallback(self))

    # ----------------------------------------------------------------- columns
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("category", "unsafe"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    # -------------------------------------------------------------------- loss
    def _reference_logps(self, model, inputs) -> torch.Tensor:
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        trl_inputs = {k: inputs[k] for k in _TRL_INPUT_KEYS}
        ref_model = self.ref_model if self.ref_model is not None else model
        chosen, rejected = self.compute_ref_log_probs(ref_model, trl_inputs)
        return torch.cat([chosen, rejected])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logits = outputs.logits
        ref_logps = self._reference_logps(model, inputs).to(logits.device)
        if self.average_log_prob:
            # TRL's reference log-probs (live or precomputed) are sums over the
            # completion; the policy side is averaged, so average the reference too.
            ref_logps = ref_logps / completion_mask[:, 1:].sum(-1).clamp(min=1).to(ref_logps.dtype)
        categories = inputs.get("category")
        if categories is None:
            raise KeyError(
                "CatDPOTrainer needs a 'category' column (int id in [-1, C) or a multi-hot list of C bools); "
                "catdpo_kernels.data.pairs_to_dataset builds one from PKU-SafeRLHF rows"
            )
        out = catdpo_loss(
            logits, labels, categories, self.margins if self.catdpo_loss_type == "catdpo" else None,
            ref_logps=ref_logps, unsafe=inputs.get("unsafe"), beta=self.beta, loss_type=self.catdpo_loss_type,
            margin=self.safedpo_margin if self.catdpo_loss_type == "safedpo" else 0.0, shift_labels=True,
            average_log_prob=self.average_log_prob, reduction=self.catdpo_reduction, backend=self.catdpo_backend,
            check_inputs=not self._checked_inputs, num_categories=len(self.margins),
        )  # fmt: skip
        self._checked_inputs = True
        stats = out.category_stats.detach()
        if mode == "train":
            self._pending_stats = stats.clone() if self._pending_stats is None else self._pending_stats + stats
        else:
            self._eval_stats = stats.clone() if self._eval_stats is None else self._eval_stats + stats
        self._log_pair_metrics(mode, out)
        return (out.loss, outputs) if return_outputs else out.loss

    def _log_pair_metrics(self, mode: str, out) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = gather(out.chosen_rewards), gather(out.rejected_rewards)
        policy = out.policy_logps.detach()
        b = policy.shape[0] // 2
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen.mean().item())
        m["rewards/rejected"].append(rejected.mean().item())
        m["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        m["rewards/margins"].append((chosen - rejected).mean().item())
        m["logps/chosen"].append(gather(policy[:b]).mean().item())
        m["logps/rejected"].append(gather(policy[b:]).mean().item())

    # ----------------------------------------------------------------- margins
    def _update_margins(self) -> None:
        """Once per optimiser step: the summed stats of its micro-batches -> ``margins.update``
        (which all-reduces them across ranks)."""
        stats, self._pending_stats = self._pending_stats, None
        if stats is not None:
            self.margins.update(stats)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.margins.history:
            seen = (self.margins.ema_count > 0).tolist()
            for c, name in enumerate(self.margins.names):
                logs[f"catdpo/margin/{name}"] = float(self.margins.value[c])
                if seen[c]:  # a category no batch has held yet has no rate
                    logs[f"catdpo/unsafe_rate/{name}"] = float(self.margins.rate[c])
        elif mode == "eval" and self._eval_stats is not None:
            table = self.accelerator.reduce(self._eval_stats.to(self.accelerator.device), reduction="sum").cpu()
            self._eval_stats = None
            for c, name in enumerate(self.margins.names):
                n = table[c, STAT_INDEX["count"]].item()
                if n > 0:
                    logs[f"eval_catdpo/unsafe_rate/{name}"] = 1.0 - table[c, STAT_INDEX["reward_acc"]].item() / n
                    logs[f"eval_catdpo/soft_unsafe/{name}"] = table[c, STAT_INDEX["unsafe_pref_sum"]].item() / n
        super().log(logs, start_time)

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.margins.state_dict(), os.path.join(folder, MARGINS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MARGINS_FILE)
        if os.path.isfile(path):
            self.margins.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
            self.margins.to(self.accelerator.device)
