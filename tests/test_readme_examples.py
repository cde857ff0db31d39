"""The README's Python examples run as written, with only the model and the batch supplied."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import catdpo_kernels as ck

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
B, T, VOCAB, C = 2, 12, 257, 19


def python_block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```\n", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, VOCAB, (2 * B, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention_mask == 0] = -100
    categories = torch.tensor([3, -1])
    unsafe = torch.tensor([0, 0, 1, 0])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, categories=categories, unsafe=unsafe)


def naive_loss(model, ref_model, data, margins):
    """The same batch through the full logits and the naive loss in float64."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    with torch.no_grad():
        ref_logits = ref_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return ck.loss(
        logits.double(),
        data["labels"],
        data["categories"],
        margins.double(),
        ref_logits=ref_logits.double(),
        unsafe=data["unsafe"],
        beta=0.1,
        shift_labels=True,
        backend="reference",
    )


def test_readme_hidden_state_example_matches_the_logits_loss():
    model, ref_model = tiny_llama(0), tiny_llama(1)
    data = batch()
    namespace = dict(model=model, ref_model=ref_model, **data)
    exec(compile(python_block("## From hidden states"), str(README), "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    expected = naive_loss(model, ref_model, data, ck.CategoryMargins.for_pku_saferlhf().value)
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.policy_logps.double(), expected.policy_logps, rtol=1e-5, atol=1e-5)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    # The example updates the margins once: category 3 saw a pair.
    assert namespace["margins"].step == 1


def test_readme_quick_start_runs_as_written():
    model, ref_model = tiny_llama(0), tiny_llama(1)
    data = batch()
    namespace = dict(model=model, ref_model=ref_model, **data)
    exec(compile(python_block("## Quick start"), str(README), "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    expected = naive_loss(model, ref_model, data, ck.CategoryMargins.for_pku_saferlhf().value)
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    assert out.category_stats.shape == (C + 1, len(ck.STAT_COLUMNS))


def _documented_parameters(call: str) -> list[str]:
    """Parameter names of a README signature such as ``f(a, b=1, *, c=None) -> X``."""
    inside = call[call.index("(") + 1 : call.rindex(")")]
    names = []
    for part in re.split(r",\s*", inside.replace("\n", " ")):
        name = part.strip().split("=")[0].strip()
        if name and name not in ("*", "..."):
            names.append(name)
    return names


@pytest.mark.parametrize(
    ("pattern", "target"),
    [
        (r"^catdpo_kernels\.loss\(\n(.*?)\) -> LossOutput", ck.loss),
        (r"`CategoryMargins\((.*?)\)` runs", ck.CategoryMargins.__init__),
    ],
)
def test_readme_signatures_are_the_real_ones(pattern, target):
    import inspect

    text = README.read_text(encoding="utf-8")
    match = re.search(pattern, text, re.S | re.M)
    assert match, pattern
    documented = _documented_parameters("(" + match.group(1) + ")")
    real = [p for p in inspect.signature(target).parameters if p != "self"]
    assert documented == real


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The two commands") :]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    test_command = next(b for b in blocks if "pytest" in b and "\n" not in b)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test_command
    assert (README.parent / test_command.rsplit("bash ", 1)[1]).is_file()
