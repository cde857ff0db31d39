"""``CatDPOTrainer``: TRL's ``DPOTrainer`` (1.x) with the Cat-DPO loss of ``catdpo_kernels``.

Tested with trl 1.16 and transformers 5.24 (the ``[trl]`` extra pins
``trl>=1.16,<2``); ``pip install "catdpo_kernels[trl]"``.

What changes relative to ``trl.DPOTrainer``:

* the loss is Cat-DPO (``catdpo_loss_type``: ``catdpo``, ``safedpo``, ``dpo`` or ``ipo``)
  with the trainer's ``CategoryMargins``, computed by default by the fused head
  (``trainer.criterion`` is a ``CatDPOLinearLoss``): the policy's backbone runs to
  its last hidden state and the loss projects the counted tokens through the
  output embedding inside the model's forward, never building the logits;
* every ``DPOConfig`` option is honoured (as TRL computes it) or refused at
  ``__init__``: ``options.OPTIONS`` lists them;
* the data set carries ``category`` and ``unsafe`` columns; the collator
  (``CatDPOCollator``) checks them, and the token ids, on the CPU for every batch;
* the category statistics of a step's micro-batches feed the margins once per
  optimiser step (all-reduced across ranks); evaluation never moves them;
* the margins are saved with the model (``save_model``, checkpoints) and
  restored on ``train(resume_from_checkpoint=...)``;
* the logs carry TRL's metrics (rewards, log-probs, entropy, logits, token
  accuracy, tokens) and per-category ``catdpo/margin/<name>``,
  ``catdpo/unsafe_rate/<name>`` and, after an evaluation, ``eval_catdpo/...``.
"""

try:
    import trl  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'catdpo_kernels.integrations.trl needs TRL 1.x: pip install "catdpo_kernels[trl]" (trl>=1.16,<2)'
    ) from e

from .collator import CatDPOCollator
from .options import OPTIONS, LossPlan, plan_loss
from .trainer import MARGINS_FILE, CatDPOTrainer

__all__ = ["MARGINS_FILE", "OPTIONS", "CatDPOCollator", "CatDPOTrainer", "LossPlan", "plan_loss"]
