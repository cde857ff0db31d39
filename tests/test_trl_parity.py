"""``CatDPOTrainer`` against TRL's own ``DPOTrainer`` on tiny random models (fp32, CPU).

With ``catdpo_loss_type="dpo"`` (or ``"ipo"``) the Cat-DPO trainer computes TRL's
``sigmoid`` (or ``ipo``) loss, so on the same batch the loss, every parameter
gradient and every metric TRL logs must agree, whether the loss comes from the
fused head (hidden states, no logits) or from logits; also with precomputed
reference log-probs, gradient accumulation, an ``sft`` term through
``loss_weights`` and a mixture of experts' router loss. Options that would change
TRL's loss in a way Cat-DPO does not reproduce are refused at ``__init__``, and
the margins travel with the model (``save_model``, checkpoints, resume).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from _utils import tiny_llama

from catdpo_kernels import data as D

pytest.importorskip("trl")

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "num_tokens",
)


def _args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        beta=0.1,
    )
    return DPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pairs_and_tok():
    pairs, _ = D.load_pairs(split="train", limit=12)
    return pairs, D.build_word_tokenizer(D.pair_texts(pairs))


def _perturb(model, seed=1):
    """Move the policy away from the reference the same way in both trainers, so that h != 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _trainers(tmp_path, pairs_and_tok, *, model=None, trl_kw=None, ours_kw=None, ref=True, **args_kw):
    from trl import DPOTrainer

    from catdpo_kernels.integrations.trl import CatDPOTrainer

    pairs, tok = pairs_and_tok
    model = model if model is not None else tiny_llama(tok)
    ds = D.pairs_to_dataset(pairs)
    common = dict(train_dataset=ds, processing_class=tok)
    theirs = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model) if ref else None,
        args=_args(tmp_path / "trl", **{**args_kw, **(trl_kw or {})}),
        **common,
    )
    ours = CatDPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model) if ref else None,
        args=_args(tmp_path / "ours", **args_kw),
        **common,
        **{"catdpo_loss_type": "dpo", **(ours_kw or {})},
    )
    for t in (theirs, ours):
        _perturb(t.model)
    return theirs, ours


def _step(trainer, n=4):
    """Loss, parameter gradients and logged metrics of one ``compute_loss`` on the first ``n`` rows."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach().item(), grads, metrics


def _assert_same(theirs, ours, *, metrics=METRICS, rtol=1e-5):
    loss_t, grads_t, m_t = theirs
    loss_o, grads_o, m_o = ours
    assert abs(loss_o - loss_t) <= rtol * max(1.0, abs(loss_t)), (loss_o, loss_t)
    assert grads_o.keys() == grads_t.keys()
    for name, g in grads_t.items():
        scale = max(g.abs().max().item(), 1.0)
        err = (grads_o[name] - g).abs().max().item()
        assert err <= rtol * scale, (name, err)
    for key in metrics:
        assert key in m_o, (key, sorted(m_o))
        assert math.isclose(m_o[key], m_t[key], rel_tol=rtol, abs_tol=rtol), (key, m_o[key], m_t[key])


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sigmoid_loss_gradients_and_metrics_match_trl(tmp_path, pairs_and_tok, head, tie):
    model = tiny_llama(pairs_and_tok[1], tie_word_embeddings=tie)
    theirs, ours = _trainers(tmp_path, pairs_and_tok, model=model, ours_kw=dict(head=head))
    assert ours.catdpo_head == head
    _assert_same(_step(theirs), _step(ours))


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_ipo_uses_length_averaged_log_ratios_like_trl(tmp_path, pairs_and_tok, head):
    theirs, ours = _trainers(tmp_path, pairs_and_tok, loss_type="ipo", ours_kw=dict(catdpo_loss_type="ipo", head=head))
    assert ours.loss_plan.average_log_prob
    # The logged rewards and log-probs stay sums over the completion, as TRL logs them.
    _assert_same(_step(theirs), _step(ours))


def test_precomputed_reference_matches_trl(tmp_path, pairs_and_tok):
    theirs, ours = _trainers(tmp_path, pairs_and_tok, precompute_ref_log_probs=True, ref=False)
    assert ours.precompute_ref_logps
    _assert_same(_step(theirs), _step(ours))


def test_sft_term_through_loss_weights_matches_trl(tmp_path, pairs_and_tok):
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[0.7, 0.3])
    theirs, ours = _trainers(tmp_path, pairs_and_tok, **kw)
    assert ours.loss_plan.sft_weight == pytest.approx(0.3)
    _assert_same(_step(theirs), _step(ours))


def test_gradient_accumulation_step_matches_trl(tmp_path, pairs_and_tok):
    theirs, ours = _trainers(
        tmp_path,
        pairs_and_tok,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
    )
    for t in (theirs, ours):
        t.train()
    params_t = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p, params_t[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ours.margins.step == 1, "one margin update per optimiser step"
    log_t = next(h for h in theirs.state.log_history if "loss" in h)
    log_o = next(h for h in ours.state.log_history if "loss" in h)
    for key in ("loss", *METRICS):
        assert math.isclose(log_o[key], log_t[key], rel_tol=1e-5, abs_tol=1e-6), (key, log_o[key], log_t[key])


def test_router_aux_loss_of_a_mixtral_matches_trl(tmp_path, pairs_and_tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    _, tok = pairs_and_tok
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    for head in ("fused", "logits"):
        theirs, ours = _trainers(
            tmp_path / head, pairs_and_tok, model=MixtralForCausalLM(config), ours_kw=dict(head=head)
        )
        assert ours.aux_loss_enabled
        _assert_same(_step(theirs), _step(ours), metrics=(*METRICS, "aux_loss"))


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(loss_type="hinge"), "loss_type.*hinge.*not supported"),
        (dict(loss_type="robust", label_smoothing=0.1), "loss_type.*robust.*not supported"),
        (dict(loss_type=["sigmoid", "ipo"]), "exactly one preference loss"),
        (dict(loss_type="ipo"), "loss_type='ipo'.*catdpo_loss_type='dpo'"),
        (dict(loss_type="sft"), "exactly one preference loss"),
        (dict(ld_alpha=0.5), "ld_alpha"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(use_weighting=True), "use_weighting"),
    ],
)
def test_refused_options_raise_at_init(tmp_path, pairs_and_tok, option, match):
    from catdpo_kernels.integrations.trl import CatDPOTrainer

    pairs, tok = pairs_and_tok
    with pytest.raises(ValueError, match=match):
        CatDPOTrainer(
            model=tiny_llama(tok),
            args=_args(tmp_path, **option),
            train_dataset=D.pairs_to_dataset(pairs),
            processing_class=tok,
            catdpo_loss_type="dpo",
        )


def test_every_dpo_config_option_is_classified():
    from transformers import TrainingArguments
    from trl import DPOConfig

    from catdpo_kernels.integrations.trl import OPTIONS

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = {f.name for f in dataclasses.fields(DPOConfig)} - base
    assert own <= set(OPTIONS), f"DPOConfig options not classified in OPTIONS: {sorted(own - set(OPTIONS))}"


def test_categories_are_optional_for_dpo_and_bad_rows_are_named(tmp_path, pairs_and_tok):
    from catdpo_kernels.integrations.trl import CatDPOTrainer

    pairs, tok = pairs_and_tok
    ds = D.pairs_to_dataset(pairs).remove_columns(["category", "unsafe"])
    trainer = CatDPOTrainer(
        model=tiny_llama(tok),
        ref_model=tiny_llama(tok),
        args=_args(tmp_path),
        train_dataset=ds,
        processing_class=tok,
        catdpo_loss_type="dpo",
    )
    loss, _, _ = _step(trainer)
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="'category' column"):
        CatDPOTrainer(model=tiny_llama(tok), args=_args(tmp_path), train_dataset=ds, processing_class=tok)
    bad = D.pairs_to_dataset(pairs)
    rows = bad.to_list()
    rows[5]["unsafe"] = [1, 0]  # chosen unsafe, rejected safe: s = -1
    from datasets import Dataset

    trainer = CatDPOTrainer(
        model=tiny_llama(tok),
        ref_model=tiny_llama(tok),
        args=_args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    with pytest.raises(ValueError, match="data set row 5: unsafe flags"):
        trainer.data_collator([trainer.train_dataset[i] for i in range(4, 8)])


def test_margins_travel_with_save_model_and_resume(tmp_path, pairs_and_tok):
    from catdpo_kernels.integrations.trl import MARGINS_FILE, CatDPOTrainer

    pairs, tok = pairs_and_tok
    ds = D.pairs_to_dataset(pairs)

    def make(out, **kw):
        return CatDPOTrainer(
            model=tiny_llama(tok),
            ref_model=tiny_llama(tok),
            args=_args(out, max_steps=2, save_steps=1, **kw),
            train_dataset=ds,
            processing_class=tok,
            margin_kwargs=dict(lr=0.5, target=0.05),
        )

    first = make(tmp_path / "run")
    first.train()
    first.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / MARGINS_FILE).is_file()
    assert (tmp_path / "run" / "checkpoint-1" / MARGINS_FILE).is_file()
    fresh = make(tmp_path / "other")
    fresh.load_margins(str(tmp_path / "final"))
    assert torch.equal(fresh.margins.value.cpu(), first.margins.value.cpu())
    assert fresh.margins.step == first.margins.step == 2
    # resume_from_checkpoint=True takes the latest checkpoint of output_dir, margins included.
    resumed = make(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    # One margin update per optimiser step, counted from the checkpoint's: restored, then continued.
    assert resumed.margins.step == resumed.state.global_step >= 2
    # Margins of other categories fail loudly.
    other = CatDPOTrainer(
        model=tiny_llama(tok),
        ref_model=tiny_llama(tok),
        args=_args(tmp_path / "x"),
        train_dataset=ds.remove_columns(["category"]),
        processing_class=tok,
        num_categories=3,
        catdpo_loss_type="dpo",
    )
    with pytest.raises(ValueError, match="categories"):
        other.load_margins(str(tmp_path / "final"))


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_trl_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### With TRL") :]
    return section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]


def test_readme_trl_example_runs_as_written(tmp_path, pairs_and_tok, monkeypatch):
    """The README's TRL example, with only the model, tokenizer and data set substituted (no hub here)."""
    pairs, tok = pairs_and_tok
    code = _readme_trl_block()
    assert 'load_pairs("PKU-Alignment/PKU-SafeRLHF")' in code
    code = code.replace('load_pairs("PKU-Alignment/PKU-SafeRLHF")', "load_pairs(split='train', limit=12)")
    monkeypatch.chdir(tmp_path)
    namespace = dict(model=tiny_llama(tok), ref_model=tiny_llama(tok), tokenizer=tok)
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0
    assert (tmp_path / "out" / "final" / "catdpo_margins.pt").is_file()


def test_readme_options_table_lists_every_option():
    from catdpo_kernels.integrations.trl import OPTIONS

    text = README.read_text(encoding="utf-8")
    for name, (status, _) in OPTIONS.items():
        assert f"| `{name}` | {status}:" in text, name
