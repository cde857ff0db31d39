"""Hugging Face causal LMs and the fused head: run the backbone, hand its last hidden state to the loss.

``add_hidden_head(model)`` gives ``model.forward`` one more keyword,
``catdpo_head=fn``: the forward then runs only the backbone and returns
``fn(hidden_states, weight, bias, backbone_outputs)`` with the output
embedding's weight and bias (and, e.g., a mixture of experts' router logits in
``backbone_outputs``), instead of building the ``(B, T, V)`` logits. The loss runs *inside* the
model's forward, so DDP, FSDP2 and ZeRO-3 hooks see a normal forward; a
sharded head is gathered first (FSDP2 ``DTensor``s through ``full_tensor()``,
which is differentiable; ZeRO-3 parameters inside ``GatheredParameters``).

``head_transform(model)`` reads what the model's own head does to a logit
(``logit_scale``, ``final_logit_softcapping``, ``logits_scaling``...), so that the
fused head computes exactly the model's logits. ``fused_head_unsupported(model)``
says why a model cannot use it (then the caller falls back to logits).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch import nn

PATCHED = "_catdpo_hidden_head"


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_transform(model) -> dict:
    """``linear_loss`` keyword arguments reproducing the model's logits transform."""
    cfg = _text_config(model)
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)  # Falcon-H1
    temperature = 1.0
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:  # Granite, MiniCPM3 divide
        if getattr(cfg, "model_type", "") == "hyperclovax":
            scale = cfg.logits_scaling
        else:
            temperature = float(cfg.logits_scaling)
    return dict(
        logit_scale=1.0 if scale is None else float(scale),
        temperature=temperature,
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),  # Gemma 2/3
    )


def fused_head_unsupported(model) -> str | None:
    """Why ``model`` cannot run the fused head (``None`` when it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_output_embeddings") or not isinstance(base.get_output_embeddings(), nn.Linear):
        return f"{type(base).__name__} has no nn.Linear output embedding"
    if _text_config(base) is not base.config:
        return f"{type(base).__name__} is not text-only (its forward merges other inputs before the decoder)"
    if not hasattr(base, getattr(base, "base_model_prefix", "model")):
        return f"{type(base).__name__} exposes no backbone"
    return None


def _gathered(weight, bias):
    """The full head for a direct read: FSDP2 DTensors gathered (differentiably), ZeRO-3 parameters gathered."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        DTensor = ()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def _zero3_context(*params):
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed  # pragma: no cover - needs DeepSpeed

    return deepspeed.zero.GatheredParameters([p for p in params if p is not None], modifier_rank=None)


def add_hidden_head(model) -> None:
    """Patch ``model.forward`` (once) with the ``catdpo_head=fn`` keyword; without it the forward is unchanged."""
    if getattr(model, PATCHED, False):
        return
    original = model.forward
    text_cfg = _text_config(model)
    backbone_name = getattr(model, "base_model_prefix", "model")

    @functools.wraps(type(model).forward)
    def forward(self, *args, catdpo_head=None, **kwargs):
        if catdpo_head is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_cfg, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = getattr(self, backbone_name)(*args, **kwargs)
        head = self.get_output_embeddings()
        hidden = outputs.last_hidden_state.to(head.weight.device)
        with _zero3_context(head.weight, head.bias):
            weight, bias = _gathered(head.weight, head.bias)
            return catdpo_head(hidden, weight, bias, outputs)

    model.forward = types.MethodType(forward, model)
    setattr(model, PATCHED, True)


def hidden_states(model, **inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(last hidden state, output weight, output bias)`` through the patched forward."""
    add_hidden_head(model)
    return model(**inputs, catdpo_head=lambda h, w, b, _outputs: (h, w, b))
