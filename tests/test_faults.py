"""Bad input never passes as a plausible number: NaN for the pairs it touches, exact values elsewhere.

* NaN/inf logits at an *ignored* position change nothing: the loss is the clean
  one and that position's gradient is exactly 0, on every backend.
* With ``check_inputs=False``, a property test feeds random out-of-range labels,
  category ids and unsafe flags: every pair they touch has a NaN loss, every
  other pair equals the loss of the clean pairs computed alone.
"""

from __future__ import annotations

import pytest
import torch
from _utils import make_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catdpo_kernels

BACKENDS = ("reference", "torch", "triton")
B, T, V, C = 3, 5, 11, 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_logits_at_ignored_positions_are_exactly_inert(backend, poison):
    batch = make_batch(B, T, V, C, seed=3, masked_frac=0.4)
    ignored = batch["labels"] == -100
    assert ignored.any()
    clean = batch["policy_logits"].clone().requires_grad_()
    dirty = batch["policy_logits"].clone()
    dirty[ignored] = poison
    dirty.requires_grad_()
    outs = []
    for x in (clean, dirty):
        out = catdpo_kernels.loss(**dict(batch, policy_logits=x), backend=backend)
        out.loss.backward()
        outs.append(out)
    assert torch.equal(outs[0].loss, outs[1].loss)
    assert torch.count_nonzero(dirty.grad[ignored]) == 0
    assert torch.equal(dirty.grad, clean.grad)


@pytest.mark.parametrize("backend", ("reference", "torch", "triton"))
def test_non_finite_hidden_states_at_uncounted_positions_are_exactly_inert(backend):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2 * B, T, 8, generator=gen)
    weight = torch.randn(V, 8, generator=gen)
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :2] = -100
    cats, margins = torch.tensor([0, -1, 2]), torch.rand(C, generator=gen)
    grads = []
    for poison in (None, float("nan")):
        h = hidden.clone()
        if poison is not None:
            h[:, 0] = poison  # position 0 scores labels[:, 1], which is ignored
        h.requires_grad_()
        w = weight.clone().requires_grad_()
        out = catdpo_kernels.linear_loss(
            h, w, labels, cats, margins, ref_logps=torch.zeros(2 * B), shift_labels=True, backend=backend
        )
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.count_nonzero(grads[1][1][:, 0]) == 0
    assert torch.equal(grads[0][2], grads[1][2])


# ------------------------------------------------------------------ property test
BAD_LABELS = st.sampled_from([V, V + 7, -1, -5])
BAD_CATEGORIES = st.sampled_from([C, C + 4, -2, -9])
BAD_FLAGS = st.sampled_from([2.0, -1.0, 0.5, float("nan")])


@st.composite
def corruptions(draw):
    """A list of ``(kind, pair, detail)``: which pairs get which bad value."""
    n = draw(st.integers(min_value=1, max_value=3))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["label", "category", "flag", "swap"]))
        pair = draw(st.integers(min_value=0, max_value=B - 1))
        if kind == "label":
            out.append((kind, pair, (draw(st.booleans()), draw(st.integers(1, T - 1)), draw(BAD_LABELS))))
        elif kind == "category":
            out.append((kind, pair, draw(BAD_CATEGORIES)))
        elif kind == "flag":
            out.append((kind, pair, (draw(st.booleans()), draw(BAD_FLAGS))))
        else:
            out.append((kind, pair, None))
    return out


def corrupt(batch, plan):
    """Apply ``plan``; returns the batch and the set of pairs it touched."""
    labels, cats = batch["labels"].clone(), batch["categories"].clone()
    unsafe = batch["unsafe"].clone().float()
    touched = set()
    for kind, pair, detail in plan:
        touched.add(pair)
        if kind == "label":
            rejected, t, value = detail
            labels[pair + B * rejected, t] = value  # t >= 1: read even with shift_labels
        elif kind == "category":
            cats[pair] = value = detail
        elif kind == "flag":
            rejected, value = detail
            unsafe[pair + B * rejected] = value
        else:  # chosen unsafe, rejected safe: s = -1
            unsafe[pair], unsafe[pair + B] = 1.0, 0.0
    return dict(batch, labels=labels, categories=cats, unsafe=unsafe), touched


def pairs_only(batch, keep):
    rows = keep + [B + i for i in keep]
    out = {k: v[rows] for k, v in batch.items() if k in ("policy_logits", "ref_logits", "labels", "unsafe")}
    return dict(out, categories=batch["categories"][keep], margins=batch["margins"])


def check_nan_or_exact(backend, plan, seed):
    batch = make_batch(B, T, V, C, seed=seed, shift=True)
    batch["unsafe"] = batch["unsafe"].float()
    bad, touched = corrupt(batch, plan)
    opts = dict(backend=backend, shift_labels=True, reduction="none", check_inputs=False)
    with pytest.raises(ValueError):
        catdpo_kernels.loss(**bad, **dict(opts, check_inputs=True))
    out = catdpo_kernels.loss(**bad, **opts)
    keep = [i for i in range(B) if i not in touched]
    for i in touched:
        assert torch.isnan(out.loss[i]), (plan, i, out.loss)
    if keep:
        clean = catdpo_kernels.loss(**pairs_only(batch, keep), **opts)
        torch.testing.assert_close(out.loss[keep], clean.loss, rtol=1e-6, atol=1e-7)
    for red in ("mean", "sum", "category_mean"):
        assert torch.isnan(catdpo_kernels.loss(**bad, **dict(opts, reduction=red)).loss), red


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=corruptions(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_bad_values_give_nan_or_the_exact_loss(backend, plan, seed):
    check_nan_or_exact(backend, plan, seed)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=corruptions(), seed=st.integers(0, 2**16))
def test_bad_values_give_nan_or_the_exact_loss_triton(plan, seed):
    check_nan_or_exact("triton", plan, seed)
