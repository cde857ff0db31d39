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
* ``compute_loss`` runs the policy's backbone to its last hidden state and calls the
  trainer's :class:`~catdpo_kernels.CatDPOLinearLoss` (``trainer.criterion``,
  ``shift_labels=True``) inside the model's forward: the fused head projects the
  counted tokens through the output embedding tile by tile, never building the
  logits (``head="logits"`` uses the full logits and ``CatDPOLoss`` instead;
  models whose forward is more than the decoder fall back to it with a note). A
  live ``ref_model`` goes through the fused head too; otherwise the reference
  log-probs come from TRL (the PEFT adapter switch, or ``precompute_ref_log_probs``);
* the criterion owns the :class:`~catdpo_kernels.CategoryMargins` (``trainer.margins``)
  and sums the category stats of every training micro-batch;
  ``criterion.update_margins()`` feeds them to the margins once per optimiser step
  (``on_step_end``), all-reduced across ranks. Evaluation calls go to the
  criterion's evaluation sum and never move the margins;
* the value checks of ``catdpo_kernels.loss`` (a host sync) run on the first batch
  only; a later out-of-range label or category shows as a NaN loss, which
  ``CategoryMargins.update`` then refuses ("stats must be finite");
* per-category metrics (``catdpo/margin/<name>``, ``catdpo/unsafe_rate/<name>``,
  and ``eval_catdpo/unsafe_rate/<name>`` after an evaluation) go to the logs; the
  margins are saved with every checkpoint (``catdpo_margins.pt``) and restored
  on ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'catdpo_kernels.integrations.trl needs TRL 1.x: pip install "catdpo_kernels[trl]" (trl>=1.16,<2)'
    ) from e

from ..constants import LOSS_TYPES
from ..margins import CategoryMargins
from ..modules import CatDPOLinearLoss, CatDPOLoss
from ..stats import CategoryStats
from .hf import add_hidden_head, fused_head_unsupported, head_transform, hidden_states

logger = logging.getLogger(__name__)

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
        criterion = self.trainer.criterion
        if criterion.pending_stats is not None:
            criterion.update_margins()  # all-reduces across ranks
        return control


class CatDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is a ``catdpo_kernels.CatDPOLoss`` (``self.criterion``).

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
        head: ``fused`` (default: the loss from hidden states, no logits) or ``logits``.

    ``trainer.criterion`` is built once ``DPOTrainer`` has set ``self.beta``;
    ``trainer.margins`` is ``trainer.criterion.margins``.
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
        head: str = "fused",
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
        if head not in ("fused", "logits"):
            raise ValueError(f"head must be 'fused' or 'logits', got {head!r}")
        self.catdpo_loss_type = catdpo_loss_type
        self.safedpo_margin = float(safedpo_margin)
        super().__init__(*args, **kwargs)
        self.catdpo_head, note = self._choose_head(head)
        if note:
            logger.warning(note)
        options = dict(
            margins=margins,
            beta=self.beta,
            loss_type=catdpo_loss_type,
            margin=self.safedpo_margin if catdpo_loss_type == "safedpo" else 0.0,
            shift_labels=True,
            average_log_prob=average_log_prob,
            reduction=reduction,
            backend=backend,
            check_inputs=True,
        )
        if self.catdpo_head == "fused":
            criterion = CatDPOLinearLoss(**options, **head_transform(self._base_model(self.model)))
        else:
            criterion = CatDPOLoss(**options)
        self.criterion = criterion.to(self.accelerator.device)
        if not isinstance(self.data_collator, CatDPOCollator):
            self.data_collator = CatDPOCollator(self.data_collator)
        self.add_callback(_MarginUpdateCallback(self))

    @staticmethod
    def _base_model(model):
        """The causal LM under the PEFT (and accelerate) wrappers."""
        while hasattr(model, "module"):
            model = model.module
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _choose_head(self, head: str) -> tuple[str, str | None]:
        """``fused`` when asked for and the model can run it (the policy and a live reference get the
        ``catdpo_head`` forward); otherwise ``logits``, with a one-line note when it fell back."""
        if head == "logits":
            return "logits", None
        reason = fused_head_unsupported(self._base_model(self.model))
        if reason is not None:
            return "logits", f"CatDPOTrainer: fused head unavailable ({reason}); using the model's logits"
        for model in (self.model, self.ref_model):
            if model is not None:
                add_hidden_head(self._base_model(model))
        return "fused", None

    @property
    def margins(self) -> CategoryMargins:
        """The criterion's ``CategoryMargins``."""
        return self.criterion.margins

    @property
    def average_log_prob(self) -> bool:
        return self.criterion.options.average_log_prob

    @average_log_prob.setter
    def average_log_prob(self, value: bool) -> None:
        self._set_loss_options(average_log_prob=bool(value))

    def _set_loss_options(self, **changes) -> None:
        """Change options of the criterion's (frozen) ``LossOptions``."""
        self.criterion.options = dataclasses.replace(self.criterion.options, **changes)

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

    def _reference_inputs(self, model, inputs) -> dict:
        """The reference side of the loss: the live reference model's hidden states and head for the
        fused head, else TRL's reference log-probs (precomputed, the reference model, or the PEFT
        adapter switched off)."""
        live_ref = self.ref_model is not None and not self.precompute_ref_logps
        if self.catdpo_head == "fused" and live_ref:
            with torch.no_grad():
                h, w, b = hidden_states(
                    self.ref_model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            return dict(ref_hidden=h, ref_weight=w, ref_bias=b)
        ref_logps = self._reference_logps(model, inputs)
        if self.average_log_prob:
            # TRL's reference log-probs (live or precomputed) are sums over the
            # completion; the policy side is averaged, so average the reference too.
            completion = inputs["completion_mask"][:, 1:].sum(-1).clamp(min=1)
            ref_logps = ref_logps / completion.to(ref_logps.dtype)
        return dict(ref_logps=ref_logps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        categories = inputs.get("category")
        if categories is None:
            raise KeyError(
                "CatDPOTrainer needs a 'category' column (int id in [-1, C) or a multi-hot list of C bools); "
                "catdpo_kernels.data.pairs_to_dataset builds one from PKU-SafeRLHF rows"
            )
        ref = self._reference_inputs(model, inputs)
        # Training calls add their stats to the step's sum, evaluation calls to the evaluation sum.
        self.criterion.train(mode == "train")
        flags = dict(unsafe=inputs.get("unsafe"), **ref)
        model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        if self.catdpo_head == "fused":
            # The loss runs inside the model's forward (DDP/FSDP/ZeRO-3 hooks see it), on the
            # last hidden state and the output embedding: no (2B, T, V) logits.
            def head(hidden, weight, bias):
                return self.criterion(hidden, weight, labels, categories, bias=bias, **flags)

            outputs = None
            out = model(**model_inputs, catdpo_head=head)
        else:
            outputs = model(**model_inputs)
            out = self.criterion(outputs.logits, labels, categories, **flags)
        if self.criterion.options.check_inputs:  # the first call checked the values; the rest only shapes
            self._set_loss_options(check_inputs=False)
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
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.margins.history:
            seen = (self.margins.ema_count > 0).tolist()
            for c, name in enumerate(self.margins.names):
                logs[f"catdpo/margin/{name}"] = float(self.margins.value[c])
                if seen[c]:  # a category no batch has held yet has no rate
                    logs[f"catdpo/unsafe_rate/{name}"] = float(self.margins.rate[c])
        elif mode == "eval":
            table = self.criterion.pop_eval_stats()  # the evaluation sum since the last eval log
            if table is not None:
                self._log_eval_stats(logs, table)
        super().log(logs, start_time)

    def _log_eval_stats(self, logs: dict[str, float], table: torch.Tensor) -> None:
        """The evaluation's per-category unsafe rates (``hard``: mean 1[h <= 0]; ``soft``), summed over ranks."""
        table = self.accelerator.reduce(table.to(self.accelerator.device), reduction="sum")
        stats = CategoryStats(table.double().cpu())
        count = stats.count.tolist()
        hard, soft = stats.unsafe_rate("hard").tolist(), stats.unsafe_rate("soft").tolist()
        for c, name in enumerate(self.margins.names):
            if count[c] > 0:
                logs[f"eval_catdpo/unsafe_rate/{name}"] = hard[c]
                logs[f"eval_catdpo/soft_unsafe/{name}"] = soft[c]

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            torch.save(self.margins.state_dict(), os.path.join(folder, MARGINS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MARGINS_FILE)
        if os.path.isfile(path):
            self.margins.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
            self.margins.to(self.accelerator.device)
