"""``CatDPOTrainer``: TRL's ``DPOTrainer`` with the Cat-DPO loss, as a drop-in replacement."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from ...constants import LOSS_TYPES
from ...margins import CategoryMargins
from ...modules import CatDPOLinearLoss, CatDPOLoss
from ...stats import CategoryStats
from ..hf import add_hidden_head, fused_head_unsupported, head_transform, hidden_states
from .collator import INDEX_COLUMN, CatDPOCollator
from .metrics import log_step, logits_metrics
from .options import plan_loss

logger = logging.getLogger(__name__)

MARGINS_FILE = "catdpo_margins.pt"
# Batch keys that are not model inputs (everything else, e.g. pixel_values, goes to the model).
_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "category", "unsafe", INDEX_COLUMN}


class _MarginUpdateCallback(TrainerCallback):
    """Feeds the stats summed over an optimiser step's micro-batches to the margins, once."""

    def __init__(self, trainer: CatDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.criterion.update_margins()
        return control


class CatDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is Cat-DPO (``catdpo_kernels``).

    Takes every ``DPOTrainer`` argument; the ``DPOConfig`` options are honoured or
    refused as listed in ``catdpo_kernels.integrations.trl.options.OPTIONS``.

    Args (on top of ``DPOTrainer``'s; ``args.beta`` is the β):
        margins: the ``CategoryMargins`` to own. Default: ``CategoryMargins(num_categories,
            names=category_names, **margin_kwargs)``, or the 19 PKU-SafeRLHF categories.
        num_categories / category_names: ``C`` and the names, when ``margins`` is not given.
        catdpo_loss_type: ``catdpo`` (default), ``safedpo`` or ``dpo`` (with TRL's
            ``loss_type="sigmoid"``), or ``ipo`` (with ``loss_type="ipo"``).
        safedpo_margin: SafeDPO's global margin (``catdpo_loss_type="safedpo"``).
        backend: ``catdpo_kernels`` backend (``auto``: Triton on CUDA, torch elsewhere).
        reduction: ``mean`` (TRL's) or ``category_mean``.
        margin_kwargs: ``CategoryMargins`` options (``init``, ``lr``, ``target``, ...).
        head: ``fused`` (default: the loss from the last hidden states, never building
            logits) or ``logits``. Models whose forward is more than a decoder and an
            ``nn.Linear`` head (vision-language models) fall back to logits with a note.

    The data set carries ``category`` (an id in ``[-1, C)`` or a list of ``C`` bools;
    needed by ``catdpo``, optional for ``dpo``/``ipo``) and ``unsafe`` (``[h_chosen,
    h_rejected]``); ``catdpo_kernels.data.pairs_to_dataset`` builds both.
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
        reduction: str = "mean",
        margin_kwargs: dict | None = None,
        head: str = "fused",
        **kwargs,
    ):
        if catdpo_loss_type not in LOSS_TYPES:
            raise ValueError(f"catdpo_loss_type must be one of {LOSS_TYPES}, got {catdpo_loss_type!r}")
        if head not in ("fused", "logits"):
            raise ValueError(f"head must be 'fused' or 'logits', got {head!r}")
        train_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        self.loss_plan = plan_loss(train_args, catdpo_loss_type) if train_args is not None else None
        margins = _make_margins(margins, num_categories, category_names, margin_kwargs)
        _check_columns(kwargs.get("train_dataset"), catdpo_loss_type)
        for key in ("train_dataset", "eval_dataset"):
            kwargs[key] = _with_row_index(kwargs.get(key))
        super().__init__(*args, **kwargs)
        if self.loss_plan is None:  # DPOTrainer made the default DPOConfig
            self.loss_plan = plan_loss(self.args, catdpo_loss_type)
        self.catdpo_head, note = self._choose_head(head)
        if note:
            logger.warning(note)
        self.criterion = self._make_criterion(margins, safedpo_margin, backend, reduction)
        vocab = self._base_model(self.model).get_output_embeddings().weight.shape[0]
        if not isinstance(self.data_collator, CatDPOCollator):
            self.data_collator = CatDPOCollator(self.data_collator, len(margins), vocab)
        self.add_callback(_MarginUpdateCallback(self))

    # ------------------------------------------------------------- set-up
    def _make_criterion(self, margins, safedpo_margin, backend, reduction):
        plan = self.loss_plan
        options = dict(
            margins=margins,
            beta=self.beta,
            loss_type=plan.catdpo_loss_type,
            margin=float(safedpo_margin) if plan.catdpo_loss_type == "safedpo" else 0.0,
            shift_labels=True,
            average_log_prob=plan.average_log_prob,
            reduction=reduction,
            backend=backend,
            # Every batch is checked on the CPU in the collator, where it costs no device sync.
            check_inputs=False,
        )
        if self.catdpo_head == "fused":
            criterion = CatDPOLinearLoss(**options, **head_transform(self._base_model(self.model)))
        else:
            criterion = CatDPOLoss(**options, inplace_backward=True)
        return criterion.to(self.accelerator.device)

    @staticmethod
    def _base_model(model):
        """The causal LM under the PEFT (and accelerate) wrappers."""
        while hasattr(model, "module"):
            model = model.module
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _choose_head(self, head: str) -> tuple[str, str | None]:
        """``fused`` when asked for and the model can run it; otherwise ``logits``, with a note."""
        if head == "logits":
            return "logits", None
        reason = fused_head_unsupported(self._base_model(self.model))
        if reason is not None:
            return "logits", f"CatDPOTrainer: fused head unavailable ({reason}); using the model's logits"
        for model in (self.model, self.ref_model):
            if model is not None:
                add_hidden_head(self._base_model(model))
        return "fused", None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("category", "unsafe", INDEX_COLUMN):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    @property
    def margins(self) -> CategoryMargins:
        return self.criterion.margins

    # --------------------------------------------------------------- loss
    def _reference_logps(self, model, inputs) -> torch.Tensor:
        """TRL's reference log-probs, summed over the completion: precomputed, the reference model,
        or the PEFT adapter switched off."""
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        trl_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        ref_model = self.ref_model if self.ref_model is not None else model
        chosen, rejected = self.compute_ref_log_probs(ref_model, trl_inputs)
        return torch.cat([chosen, rejected])

    def _reference_inputs(self, model, inputs, counts) -> dict:
        """The reference side of the loss: a live reference model's hidden states and head for the
        fused head, else TRL's summed log-probs (averaged like the policy's for IPO)."""
        if self.catdpo_head == "fused" and self.ref_model is not None and not self.precompute_ref_logps:
            with torch.no_grad():
                h, w, b = hidden_states(
                    self.ref_model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            return dict(ref_hidden=h, ref_weight=w, ref_bias=b)
        ref = self._reference_logps(model, inputs)
        if self.loss_plan.average_log_prob:
            ref = ref / counts.to(ref.dtype)
        return dict(ref_logps=ref)

    def _model_inputs(self, inputs) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        return kwargs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        counts = (labels[:, 1:] != -100).sum(-1).clamp(min=1)
        flags = dict(unsafe=inputs.get("unsafe"), **self._reference_inputs(model, inputs, counts))
        categories = inputs.get("category")
        # Training calls add their stats to the step's sum, evaluation calls to the evaluation sum.
        self.criterion.train(mode == "train")
        outputs = None
        if self.catdpo_head == "fused":
            # The loss runs inside the model's forward (DDP/FSDP/ZeRO-3 hooks see it), on the
            # last hidden state and the output embedding: no (2B, T, V) logits.
            def fused(hidden, weight, bias, backbone):
                out, head = self.criterion(hidden, weight, labels, categories, bias=bias, return_metrics=True, **flags)
                return out, head, self._router_loss(backbone, inputs)

            out, head, aux = model(**self._model_inputs(inputs), catdpo_head=fused)
        else:
            outputs = model(**self._model_inputs(inputs))
            head = logits_metrics(outputs.logits, labels)
            out = self.criterion(outputs.logits, labels, categories, **flags)
            aux = outputs.aux_loss if self.aux_loss_enabled else None
        loss, policy_sums, ref_sums = self._total_loss(out, counts, aux)
        log_step(
            self,
            mode,
            policy_sums=policy_sums,
            ref_sums=ref_sums,
            head=head,
            attention_mask=inputs["attention_mask"],
            aux_loss=aux,
        )
        return (loss, outputs) if return_outputs else loss

    def _total_loss(self, out, counts, aux):
        """``w·Cat-DPO + w_sft·SFT (+ router loss)``, and the policy / reference log-prob sums."""
        plan = self.loss_plan
        scale = counts.to(out.policy_logps.dtype) if plan.average_log_prob else 1.0
        policy_sums = out.policy_logps * scale
        ref_sums = out.ref_logps * scale
        loss = plan.preference_weight * out.loss
        if plan.sft_weight:
            b = policy_sums.shape[0] // 2
            # TRL's sft term: the mean negative log-prob over all chosen completion tokens.
            loss = loss - plan.sft_weight * policy_sums[:b].sum() / counts[:b].sum()
        if aux is not None:
            loss = loss + self.router_aux_loss_coef * aux
        return loss, policy_sums, ref_sums

    def _router_loss(self, backbone, inputs):
        """A mixture of experts' load-balancing loss from the backbone's router logits, as TRL adds it."""
        if not self.aux_loss_enabled or getattr(backbone, "router_logits", None) is None:
            return None
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        cfg = self._base_model(self.model).config.get_text_config()
        return load_balancing_loss_func(
            backbone.router_logits, cfg.num_experts, cfg.num_experts_per_tok, inputs.get("attention_mask")
        )

    # ------------------------------------------------------------- logging
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
        """The evaluation's per-category unsafe rates, summed over ranks: ``hard`` (mean 1[h < 0] + ½·1[h = 0])
        and ``soft``."""
        table = self.accelerator.reduce(table.to(self.accelerator.device), reduction="sum")
        stats = CategoryStats(table.double().cpu())
        count = stats.count.tolist()
        hard, soft = stats.unsafe_rate("hard").tolist(), stats.unsafe_rate("soft").tolist()
        for c, name in enumerate(self.margins.names):
            if count[c] > 0:
                logs[f"eval_catdpo/unsafe_rate/{name}"] = hard[c]
                logs[f"eval_catdpo/soft_unsafe/{name}"] = soft[c]

    # --------------------------------------------------------- persistence
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the model as ``DPOTrainer`` does, and the margins beside it (checkpoints included)."""
        super().save_model(output_dir, _internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            torch.save(self.margins.state_dict(), os.path.join(folder, MARGINS_FILE))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``DPOTrainer.train``; a resumed run (a path, or ``True`` for the latest checkpoint) first
        restores the margins saved with that checkpoint (whichever engine restores the rest)."""
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)):
            self.load_margins(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def load_margins(self, folder) -> None:
        """Restore the margins saved in ``folder`` (a checkpoint or a ``save_model`` directory).

        Raises ``FileNotFoundError`` when the folder holds none, and ``ValueError`` when they belong
        to other categories than this trainer's.
        """
        file = os.path.join(folder, MARGINS_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{folder} holds no {MARGINS_FILE} (saved by CatDPOTrainer.save_model)")
        state = torch.load(file, map_location="cpu", weights_only=True)
        names = tuple(state.get("names", ())) if isinstance(state, dict) else ()
        if names != tuple(self.margins.names):
            raise ValueError(
                f"{file} holds margins for {len(names)} categories {list(names)[:3]}..., but this trainer's "
                f"data has {len(self.margins)} {list(self.margins.names)[:3]}...: resume with the same categories"
            )
        self.margins.load_state_dict(state)
        self.margins.to(self.accelerator.device)


def _check_columns(dataset, loss_type: str) -> None:
    """Refuse, before any model is loaded, a data set the loss type cannot use."""
    columns = set(getattr(dataset, "column_names", None) or [])
    if not columns:
        return
    if loss_type == "catdpo" and "category" not in columns:
        raise ValueError(
            "catdpo_loss_type='catdpo' needs a 'category' column (an id in [-1, C) or a list of C bools); "
            "catdpo_kernels.data.pairs_to_dataset builds one from PKU-SafeRLHF rows"
        )
    if loss_type == "safedpo" and not columns & {"category", "unsafe"}:
        raise ValueError(
            "catdpo_loss_type='safedpo' needs an 'unsafe' or a 'category' column: without them no pair is "
            "safe-vs-unsafe and the margin never applies (that is plain DPO: use catdpo_loss_type='dpo')"
        )


def _make_margins(margins, num_categories, category_names, margin_kwargs) -> CategoryMargins:
    if margins is not None:
        if margin_kwargs:
            raise TypeError("pass either margins= or margin_kwargs=, not both")
        return margins
    if num_categories is None and category_names is None:
        return CategoryMargins.for_pku_saferlhf(**(margin_kwargs or {}))
    c = num_categories if num_categories is not None else len(category_names)
    return CategoryMargins(c, names=category_names, **(margin_kwargs or {}))


def _with_row_index(dataset):
    """The data set with a ``catdpo_index`` column, so that a bad row can be named by its index."""
    if dataset is None or isinstance(dataset, dict) or not hasattr(dataset, "column_names"):
        return dataset
    if INDEX_COLUMN in (dataset.column_names or []):
        return dataset
    if hasattr(dataset, "__len__"):
        return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
    return dataset.map(lambda _, i: {INDEX_COLUMN: i}, with_indices=True)
