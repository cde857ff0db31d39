"""The policy, its tokenizer and the frozen reference; the forward and the loss of one batch.

Without ``--model``: a tiny randomly initialised Llama (``transformers.LlamaConfig``)
and a word-level tokenizer trained on the run's text (nothing is downloaded).

``batch_loss`` runs one batch through a model and the loss, with one of two heads:

* ``fused`` (default): the model's forward stops at the last hidden state, and the
  loss (``linear_loss`` / ``CatDPOLinearLoss``) projects the counted tokens through
  the output embedding tile by tile, inside that forward, so DDP's hooks see it;
* ``logits``: the model's full logits, then ``loss`` / ``CatDPOLoss``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from .. import data as D
from ..functional import linear_loss, loss
from ..integrations.hf import add_hidden_head, fused_head_unsupported, head_transform, hidden_states
from .batches import Split, collate
from .config import TrainConfig


def build_model_and_tokenizer(cfg: TrainConfig, texts, checkpoint: Path | None):
    """``(policy, tokenizer)``: ``--model`` loaded in fp32, or the tiny Llama (a resumed run reuses the
    checkpoint's tokenizer, so that the vocabulary is the same)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.model is not None:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        return model, tok
    if checkpoint is not None and (checkpoint / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    else:
        tok = D.build_word_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.max_length, 64),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config), tok


def build_reference(policy, cfg: TrainConfig, state: dict | None, device: torch.device):
    """The frozen initial policy: a copy taken before the first step; on resume, the copy saved in the
    checkpoint (with ``--model``: the model loaded again from its path)."""
    ref_model = copy.deepcopy(policy)
    ref_state = state.get("reference") if state is not None else None
    if ref_state is not None:
        ref_model.load_state_dict(ref_state)
    elif state is not None and cfg.model is not None:
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)
    return ref_model.eval().requires_grad_(False)


def autocast(device: torch.device, cfg: TrainConfig):
    """bf16 autocast with ``--bf16 on``, or ``auto`` on CUDA; otherwise nothing."""
    on = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def logits(model, batch: dict, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """``(2B, T, V)`` logits of a collated batch."""
    with autocast(device, cfg):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def choose_head(cfg: TrainConfig, policy, ref_model) -> tuple[str, dict, str | None]:
    """``(head, transform, note)``: the head the run uses, the model's logit transform, and why a
    requested fused head fell back to logits (``None`` when it did not)."""
    if cfg.head == "logits":
        return "logits", {}, None
    reason = fused_head_unsupported(policy)
    if reason is not None:
        return "logits", {}, f"fused head unavailable ({reason}): using the model's logits"
    for model in (policy, ref_model):
        add_hidden_head(model)
    return "fused", head_transform(policy), None


def batch_loss(head: str, model, ref_model, batch: dict, device, cfg: TrainConfig, loss_fn, transform: dict):
    """One batch through ``model`` (and the reference) and ``loss_fn``; returns its ``LossOutput``.

    ``loss_fn`` is a criterion module, or ``loss`` / ``linear_loss`` with their options bound:
    it gets the policy's logits or hidden states, the labels, categories and flags, and the
    reference as precomputed log-probs, logits, or hidden states and head.
    """
    common = dict(unsafe=batch["unsafe"])
    if "ref_logps" in batch:
        common["ref_logps"] = batch["ref_logps"]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if head == "logits":
        if "ref_logps" not in common:
            with torch.no_grad():
                common["ref_logits"] = logits(ref_model, batch, device, cfg)
        return loss_fn(logits(model, batch, device, cfg), batch["labels"], batch["categories"], **common)
    if "ref_logps" not in common:
        with torch.no_grad(), autocast(device, cfg):
            ref_hidden, ref_weight, ref_bias = hidden_states(ref_model, **inputs)
        common.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)

    def head_loss(hidden, weight, bias, _outputs):
        return loss_fn(hidden, weight, batch["labels"], batch["categories"], bias=bias, **common)

    with autocast(device, cfg):
        return model(**inputs, use_cache=False, catdpo_head=head_loss)


def bind_loss(head: str, transform: dict, **options):
    """``loss`` or ``linear_loss`` (with the model's logit transform) with ``options`` bound."""
    if head == "logits":
        return lambda *args, **kw: loss(*args, **kw, **options)
    return lambda *args, **kw: linear_loss(*args, **kw, **transform, **options)


@torch.no_grad()
def reference_logps(
    model, split: Split, cfg: TrainConfig, pad_id: int, device, num_categories: int, head: str, transform: dict
) -> torch.Tensor:
    """``(N, 2)`` reference log-probs (chosen, rejected) of every pair, with the package's own kernel."""
    n = len(split.tokenized)
    out = torch.empty(n, 2, dtype=torch.float32)
    bare = Split(split.pairs, split.tokenized, split.report)  # no ref_logps: the batches carry none
    for start in range(0, n, cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, n)))
        batch = collate(bare, idx, pad_id, device)
        batch["ref_logps"] = torch.zeros(2 * len(idx), device=device)
        loss_fn = bind_loss(
            head,
            transform,
            loss_type="dpo",
            beta=cfg.beta,
            shift_labels=True,
            average_log_prob=cfg.average_log_prob,
            backend=cfg.backend,
            num_categories=num_categories,
        )
        res = batch_loss(head, model, None, batch, device, cfg, loss_fn, transform)
        logps = res.policy_logps.float().cpu()
        out[start : start + len(idx), 0] = logps[: len(idx)]
        out[start : start + len(idx), 1] = logps[len(idx) :]
    return out
