"""``CatDPOLoss``: ``loss()`` as a module that owns its margins and the statistics of a step.

The once-per-step logic of Cat-DPO lives here and nowhere else:

* every training call (module in ``train()`` mode, grad enabled) adds its
  ``category_stats`` to the step's sum;
* evaluation calls (``eval()`` mode or ``no_grad``) add theirs to a separate sum
  that ``pop_eval_stats()`` hands over, and never move the margins;
* ``update_margins()``, once per optimiser step, feeds the step's sum to
  ``CategoryMargins.update`` (which all-reduces it across ranks) and starts the next step.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import LossOutput, loss
from .margins import CategoryMargins
from .options import LossOptions
from .stats import StatsAccumulator


class CatDPOLoss(nn.Module):
    """``loss()`` as a module that owns its ``CategoryMargins`` and the stats of the step.

    Args:
        num_categories: ``C``; builds ``CategoryMargins(C, **margin_options)`` when
            ``margins`` is not given.
        margins: a ``CategoryMargins`` to own instead.
        beta, loss_type, margin, ignore_index, average_log_prob, shift_labels, reduction,
            backend, check_inputs, inplace_backward: as in ``loss()``.
        margin_options: ``CategoryMargins`` options (``init``, ``lr``, ``target``, ...).

    For ``dpo``/``ipo``/``safedpo`` the margins (if any) only track the per-category
    unsafe rate: the loss does not read them.
    """

    def __init__(
        self,
        num_categories: int | None = None,
        *,
        margins: CategoryMargins | None = None,
        beta: float = 0.1,
        loss_type: str = "catdpo",
        margin: float = 0.0,
        ignore_index: int = -100,
        average_log_prob: bool = False,
        shift_labels: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        check_inputs: bool = True,
        inplace_backward: bool = False,
        **margin_options,
    ):
        super().__init__()
        self.options = LossOptions(
            loss_type=loss_type,
            beta=beta,
            margin=margin,
            reduction=reduction,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            average_log_prob=average_log_prob,
            inplace_backward=inplace_backward,
            check_inputs=check_inputs,
            backend=backend,
        )
        if margins is None and num_categories is not None and num_categories > 0:
            margins = CategoryMargins(num_categories, **margin_options)
        elif margin_options:
            raise TypeError(
                f"unexpected arguments {sorted(margin_options)} "
                "(CategoryMargins options need num_categories and no margins=)"
            )
        if self.options.spec.margin == "per_category" and margins is None:
            raise ValueError(
                f"CatDPOLoss with loss_type={loss_type!r} needs num_categories or margins=CategoryMargins(...)"
            )
        if margins is not None and num_categories is not None and len(margins) != num_categories:
            raise ValueError(f"margins has C={len(margins)} but num_categories={num_categories}")
        self.margins = margins
        self.num_categories = len(margins) if margins is not None else num_categories
        self._step_stats = StatsAccumulator()
        self._eval_stats = StatsAccumulator()

    @property
    def pending_stats(self) -> torch.Tensor | None:
        """The training stats summed since the last ``update_margins()`` (``None`` before any)."""
        return self._step_stats.total

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() move the margins too: loss() then never copies them.
        super()._apply(fn, *args, **kwargs)
        if self.margins is not None:
            self.margins.to(fn(self.margins.value).device)
        return self

    def loss_kwargs(self) -> dict:
        """The keyword arguments this module passes to ``loss()`` (and ``linear_loss()``)."""
        o = self.options
        reads_margins = o.spec.margin == "per_category"
        return dict(
            margins=self.margins if reads_margins else None,
            num_categories=self.num_categories,
            beta=o.beta,
            loss_type=o.loss_type,
            margin=o.margin,
            ignore_index=o.ignore_index,
            average_log_prob=o.average_log_prob,
            shift_labels=o.shift_labels,
            reduction=o.reduction,
            backend=o.backend,
            check_inputs=o.check_inputs,
            inplace_backward=o.inplace_backward,
        )

    def forward(
        self, policy_logits, labels, categories=None, *, ref_logits=None, ref_logps=None, unsafe=None
    ) -> LossOutput:
        out = loss(
            policy_logits,
            labels,
            categories,
            ref_logits=ref_logits,
            ref_logps=ref_logps,
            unsafe=unsafe,
            **self.loss_kwargs(),
        )
        self.record(out.category_stats)
        return out

    def record(self, category_stats: torch.Tensor) -> None:
        """Add a call's table to the step's sum (training) or to the evaluation sum."""
        training = self.training and torch.is_grad_enabled()
        (self._step_stats if training else self._eval_stats).add(category_stats)

    def update_margins(self, *, unsafe_rate=None) -> torch.Tensor | None:
        """Feed the stats summed since the last call to the margins; returns the new margins.

        Call once per optimiser step, after the last micro-batch's backward. With
        ``unsafe_rate`` (an external ``(C,)`` rate, e.g. from a judge) the margins
        follow that rate instead.
        """
        stats = self._step_stats.take()
        if self.margins is None:
            return None
        if stats is None and unsafe_rate is None:
            raise RuntimeError("update_margins() before any training forward(): no category stats to update from")
        return self.margins.update(stats, unsafe_rate=unsafe_rate)

    def pop_eval_stats(self) -> torch.Tensor | None:
        """The evaluation stats summed since the last call (``None`` if there were none)."""
        return self._eval_stats.take()

    def get_extra_state(self):
        return {"margins": self.margins.state_dict() if self.margins is not None else None}

    def set_extra_state(self, state):
        if self.margins is not None and state.get("margins") is not None:
            self.margins.load_state_dict(state["margins"])


class CatDPOLinearLoss(CatDPOLoss):
    """``linear_loss()`` as a module: the fused LM head, with the margins and step statistics of ``CatDPOLoss``.

    Args (on top of ``CatDPOLoss``'s, without ``inplace_backward``):
        temperature, logit_scale, final_logit_softcapping: the head's transform.
        memory_budget: bytes of logits tiles and accumulators (``None``: the device default).

    ``forward(hidden, weight, labels, categories=None, *, bias=None, ref_hidden=None,
    ref_weight=None, ref_bias=None, ref_logps=None, cu_seqlens=None, unsafe=None,
    return_metrics=False)`` returns a ``LossOutput`` (and ``HeadMetrics`` when asked).
    """

    def __init__(
        self,
        num_categories: int | None = None,
        *,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        final_logit_softcapping: float | None = None,
        memory_budget: int | None = None,
        **kwargs,
    ):
        if kwargs.get("inplace_backward"):
            raise ValueError("inplace_backward applies to loss() on logits; the fused head never builds logits")
        super().__init__(num_categories, **kwargs)
        from .head import HeadTransform

        HeadTransform(temperature, logit_scale, final_logit_softcapping)  # validates
        self.head_options = dict(
            temperature=temperature,
            logit_scale=logit_scale,
            final_logit_softcapping=final_logit_softcapping,
            memory_budget=memory_budget,
        )

    def forward(
        self,
        hidden,
        weight,
        labels,
        categories=None,
        *,
        bias=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        ref_logps=None,
        cu_seqlens=None,
        unsafe=None,
        return_metrics=False,
    ):
        from .functional import linear_loss

        kwargs = self.loss_kwargs()
        kwargs.pop("inplace_backward")
        result = linear_loss(
            hidden,
            weight,
            labels,
            categories,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
            cu_seqlens=cu_seqlens,
            unsafe=unsafe,
            return_metrics=return_metrics,
            **self.head_options,
            **kwargs,
        )
        out = result[0] if return_metrics else result
        self.record(out.category_stats)
        return result
