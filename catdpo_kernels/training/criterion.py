"""The run's ``CatDPOLoss``: the loss options of ``TrainConfig`` and the margins it owns.

For ``catdpo`` the margins are the adaptive ``CategoryMargins``. For ``dpo``,
``ipo`` and ``safedpo`` a ``CategoryMargins`` with ``lr=0`` tracks the
per-category EMA unsafe rate (for the progress bar and the logs): its value
(SafeDPO's global margin, or 0) never moves and the loss does not read it.
"""

from __future__ import annotations

import dataclasses

from ..margins import CategoryMargins
from ..modules import CatDPOLinearLoss, CatDPOLoss
from .config import TrainConfig


def global_margin(cfg: TrainConfig) -> float:
    """SafeDPO's one global margin; 0 for the other loss types."""
    return cfg.safedpo_margin if cfg.loss_type == "safedpo" else 0.0


def make_margins(cfg: TrainConfig, names) -> CategoryMargins:
    """The adaptive margins for ``catdpo``; for the other losses a tracker with ``lr=0``."""
    kw = dict(
        target=cfg.margin_target,
        ema=cfg.margin_ema,
        min_count=cfg.margin_min_count,
        warmup_steps=cfg.margin_warmup_steps,
        mode=cfg.margin_mode,
        signal=cfg.margin_signal,
        names=names,
    )
    if cfg.loss_type == "catdpo":
        return CategoryMargins(
            len(names),
            init=cfg.margin_init,
            lr=cfg.margin_lr,
            min_margin=cfg.margin_min,
            max_margin=cfg.margin_max,
            **kw,
        )
    init = global_margin(cfg)
    return CategoryMargins(len(names), init=init, lr=0.0, min_margin=min(init, 0.0), max_margin=max(init, 0.0), **kw)


def make_criterion(cfg: TrainConfig, names, head: str = "logits", transform: dict | None = None) -> CatDPOLoss:
    """One criterion for the whole run (``shift_labels=True``: the labels are aligned with the inputs):
    ``CatDPOLinearLoss`` with the model's logit transform for the fused head, ``CatDPOLoss`` for logits."""
    options = dict(
        margins=make_margins(cfg, names),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        margin=global_margin(cfg),
        shift_labels=True,
        average_log_prob=cfg.average_log_prob,
        reduction=cfg.reduction,
        backend=cfg.backend,
        check_inputs=True,
    )
    if head == "fused":
        return CatDPOLinearLoss(**options, **(transform or {}))
    return CatDPOLoss(**options, inplace_backward=cfg.inplace_backward)


def stop_input_checks(criterion: CatDPOLoss) -> None:
    """After the first training call: skip the value checks (a host sync on CUDA) from now on.

    A later out-of-range label or category then shows as a NaN loss, which
    ``CategoryMargins.update`` refuses ("stats must be finite").
    """
    if criterion.options.check_inputs:
        criterion.options = dataclasses.replace(criterion.options, check_inputs=False)


def eval_loss_kwargs(criterion: CatDPOLoss) -> dict:
    """The criterion's ``loss()`` / ``linear_loss()`` arguments for a held-out call: per-pair losses, inputs checked."""
    kwargs = dict(criterion.loss_kwargs(), reduction="none", check_inputs=True)
    if isinstance(criterion, CatDPOLinearLoss):
        kwargs.pop("inplace_backward")  # the logit transform comes with model.bind_loss
    return kwargs
