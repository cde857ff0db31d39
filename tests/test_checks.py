"""Every bad input to ``loss()`` raises a ValueError/TypeError whose message names the argument."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from _utils import make_batch

import catdpo_kernels
from catdpo_kernels import CategoryMargins

B, T, V, C = 2, 4, 11, 3


@pytest.fixture
def batch():
    return make_batch(B, T, V, C, seed=3)


def call(batch, **overrides):
    kwargs = {**batch, "backend": "torch", **overrides}
    return catdpo_kernels.loss(**kwargs)


def raises(batch, exc, match, **overrides):
    with pytest.raises(exc, match=match):
        call(batch, **overrides)


def test_the_fixture_itself_is_valid(batch):
    for backend in ("torch", "reference"):
        out = call(batch, backend=backend)
        assert torch.isfinite(out.loss)


# ------------------------------------------------------------------- logits
def test_policy_logits_wrong_type_ndim_dtype(batch):
    raises(batch, TypeError, "policy_logits", policy_logits=batch["policy_logits"].numpy())
    raises(batch, ValueError, "policy_logits.*3-D", policy_logits=batch["policy_logits"][0])
    raises(batch, ValueError, "policy_logits.*3-D", policy_logits=batch["policy_logits"].unsqueeze(0))
    raises(batch, TypeError, "policy_logits.*float", policy_logits=batch["policy_logits"].long())
    raises(batch, TypeError, "policy_logits.*float", policy_logits=batch["policy_logits"].to(torch.complex64))


def test_odd_or_empty_rows(batch):
    odd = batch["policy_logits"][:3]
    three = dict(policy_logits=odd, labels=batch["labels"][:3], ref_logits=batch["ref_logits"][:3], unsafe=None)
    raises(batch, ValueError, "policy_logits.*even", **three)
    none = dict(policy_logits=odd[:0], labels=batch["labels"][:0], ref_logits=batch["ref_logits"][:0], unsafe=None)
    raises(batch, ValueError, "policy_logits.*even", **none)


def test_empty_tokens_or_vocab(batch):
    x = batch["policy_logits"]
    no_tokens = dict(policy_logits=x[:, :0], labels=batch["labels"][:, :0], ref_logits=batch["ref_logits"][:, :0])
    raises(batch, ValueError, "policy_logits.*T >= 1", **no_tokens)
    no_vocab = dict(policy_logits=x[:, :, :0], ref_logits=batch["ref_logits"][:, :, :0])
    raises(batch, ValueError, "policy_logits.*V >= 1", **no_vocab)


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_non_contiguous_vocab_dim_on_fused_backends(batch, backend):
    x = batch["policy_logits"].transpose(1, 2).contiguous().transpose(1, 2)
    assert x.stride(-1) != 1
    raises(batch, ValueError, "policy_logits.*contiguous vocab", policy_logits=x, backend=backend)
    r = batch["ref_logits"].transpose(1, 2).contiguous().transpose(1, 2)
    raises(batch, ValueError, "ref_logits.*contiguous vocab", ref_logits=r, backend=backend)
    # The naive reference takes any strides.
    out = call(batch, policy_logits=x, ref_logits=r, backend="reference")
    torch.testing.assert_close(out.loss, call(batch, backend="reference").loss)


def test_shift_labels_needs_two_tokens(batch):
    x = batch["policy_logits"][:, :1]
    one_token = dict(policy_logits=x, labels=batch["labels"][:, :1], ref_logits=batch["ref_logits"][:, :1])
    raises(batch, ValueError, "shift_labels.*T >= 2", shift_labels=True, **one_token)


# ------------------------------------------------------------------- labels
def test_labels_type_dtype_shape(batch):
    raises(batch, TypeError, "labels.*torch.Tensor", labels=batch["labels"].tolist())
    raises(batch, TypeError, "labels.*int64 or int32", labels=batch["labels"].float())
    raises(batch, TypeError, "labels.*int64 or int32", labels=batch["labels"] >= 0)
    # Narrow integer types passed an is-integer check before and then failed inside gather.
    raises(batch, TypeError, "labels.*int64 or int32.*int16", labels=batch["labels"].to(torch.int16))
    raises(batch, TypeError, "labels.*int64 or int32.*uint8", labels=batch["labels"].clamp(min=0).to(torch.uint8))
    raises(batch, ValueError, r"labels.*\(2B, T\)", labels=batch["labels"][:, :-1])
    raises(batch, ValueError, r"labels.*\(2B, T\)", labels=batch["labels"].reshape(-1))


@pytest.mark.parametrize("bad", [V, V + 100, -1, -99])
def test_labels_out_of_range(batch, bad):
    labels = batch["labels"].clone()
    labels[3, 1] = bad
    with pytest.raises(ValueError, match=rf"labels.*\[0, V={V}\).*labels\(3, 1\) = {bad}"):
        call(batch, labels=labels)
    with pytest.raises(ValueError, match="labels"):
        call(batch, labels=labels, backend="reference")
    if bad < 0:  # the same label is fine when it is the ignore_index
        labels[labels == -100] = bad
        assert torch.isfinite(call(batch, labels=labels, ignore_index=bad).loss)


def test_int32_labels_and_categories_are_accepted(batch):
    for backend in ("torch", "reference"):
        a = call(batch, backend=backend)
        b = call(batch, labels=batch["labels"].int(), categories=batch["categories"].int(), backend=backend)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.category_stats, b.category_stats)


# ------------------------------------------------------------------- reference
def test_exactly_one_of_ref_logits_and_ref_logps(batch):
    raises(batch, ValueError, "exactly one of ref_logits.*ref_logps", ref_logits=None)
    raises(batch, ValueError, "exactly one of ref_logits.*ref_logps", ref_logps=torch.zeros(2 * B))


def test_ref_logits_and_ref_logps_shapes_dtypes(batch):
    raises(batch, ValueError, "ref_logits.*shape", ref_logits=batch["ref_logits"][:, :, :-1])
    raises(batch, TypeError, "ref_logits.*float", ref_logits=batch["ref_logits"].long())
    raises(batch, TypeError, "ref_logits.*torch.Tensor", ref_logits=1.0)
    no_ref = dict(ref_logits=None)
    raises(batch, ValueError, r"ref_logps.*\(2B,\)", ref_logps=torch.zeros(B), **no_ref)
    raises(batch, ValueError, r"ref_logps.*\(2B,\)", ref_logps=torch.zeros(2 * B, 1), **no_ref)
    raises(batch, TypeError, "ref_logps.*float", ref_logps=torch.zeros(2 * B, dtype=torch.int64), **no_ref)


# ------------------------------------------------------------------- categories
def test_categories_out_of_range(batch):
    for bad in (C, C + 5, -2):
        cats = batch["categories"].clone()
        cats[1] = bad
        with pytest.raises(ValueError, match=rf"categories.*\[-1, C={C}\).*categories\[1\] = {bad}"):
            call(batch, categories=cats)


def test_categories_wrong_dtype_or_shape(batch):
    raises(batch, TypeError, "categories.*int64 or int32", categories=batch["categories"].float())
    raises(batch, TypeError, "categories.*int64 or int32", categories=batch["categories"].to(torch.int8))
    # C = 0 used to pass every check and then fail inside max().
    raises(batch, ValueError, "C >= 1", categories=torch.zeros(B, 0, dtype=torch.bool), margins=None, loss_type="dpo")
    raises(
        batch, ValueError, "C >= 1", categories=torch.full((B,), -1), margins=None, loss_type="dpo", num_categories=0
    )
    raises(batch, ValueError, r"categories.*\(B,\)", categories=batch["categories"][:1])
    raises(batch, ValueError, "categories", categories=batch["categories"].reshape(1, 1, -1))
    raises(batch, TypeError, "categories.*torch.Tensor", categories=[0, 1])
    hot = torch.zeros(B, C, dtype=torch.bool)
    raises(batch, TypeError, "categories.*multi-hot.*bool", categories=hot.long())
    raises(batch, TypeError, "categories.*multi-hot.*bool", categories=hot.float())
    raises(batch, ValueError, r"categories.*\(B, C\)", categories=hot[:1])


def test_number_of_categories_must_agree(batch):
    hot = torch.zeros(B, C + 1, dtype=torch.bool)
    raises(batch, ValueError, "C disagrees.*margins gives C=3.*categories gives C=4", categories=hot)
    raises(batch, ValueError, "C disagrees.*margins gives C=3.*num_categories gives C=5", num_categories=5)
    dpo = dict(margins=None, loss_type="dpo", categories=torch.zeros(B, 3, dtype=torch.bool))
    raises(batch, ValueError, "C disagrees.*num_categories gives C=2.*categories gives C=3", num_categories=2, **dpo)
    raises(batch, ValueError, "categories.*need margins= or num_categories=", loss_type="dpo", margins=None)
    raises(batch, ValueError, "num_categories.*int >= 0", num_categories=-1)
    raises(batch, ValueError, "num_categories.*int >= 0", num_categories=True)
    # A CategoryMargins of the wrong size.
    hot = torch.ones(B, C, dtype=torch.bool)
    raises(batch, ValueError, "C disagrees.*margins gives C=5", margins=CategoryMargins(C + 2), categories=hot)
    # With (B,) ids the margins fix C, so an id >= len(margins) is out of range.
    raises(batch, ValueError, r"categories.*\[-1, C=1\)", margins=CategoryMargins(1), categories=torch.tensor([0, 1]))


# ------------------------------------------------------------------- margins
def test_margins_checks(batch):
    raises(batch, ValueError, "loss_type='catdpo' needs margins", margins=None)
    raises(batch, ValueError, r"margins.*1-D \(C,\)", margins=torch.ones(1, C))
    raises(batch, TypeError, "margins.*float", margins=torch.ones(C, dtype=torch.int64))
    raises(batch, TypeError, "margins.*torch.Tensor", margins=[0.5] * C)
    for bad in (float("nan"), float("inf"), -float("inf")):
        m = batch["margins"].clone()
        m[1] = bad
        raises(batch, ValueError, "margins must be finite", margins=m)
    # A loss type that would ignore them refuses margins before looking at their values.
    m = batch["margins"].clone()
    m[0] = float("nan")
    raises(batch, ValueError, "margins.*loss_type='dpo' would ignore it", margins=m, loss_type="dpo")


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), "0.5", True])
def test_scalar_margin_must_be_a_finite_float(batch, margin):
    safedpo = dict(loss_type="safedpo", margins=None, num_categories=C)
    raises(batch, ValueError, "margin must be a finite float", margin=margin, **safedpo)


# ------------------------------------------------------------------- the margin rule
# docs/design.md, "Math": catdpo reads the per-category margins=, safedpo the scalar
# margin=; passing one that the loss type would ignore is an error.
def expected_counts(categories: torch.Tensor) -> list[float]:
    """Pairs per stats row for (B,) ids in [-1, C): row C holds the -1s."""
    rows = torch.where(categories < 0, C, categories)
    return torch.bincount(rows, minlength=C + 1).float().tolist()


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "safedpo"])
def test_margins_are_refused_by_loss_types_that_ignore_them(batch, loss_type):
    margin = 0.5 if loss_type == "safedpo" else 0.0
    hint = "pass the scalar margin= instead" if loss_type == "safedpo" else "it takes no margin"
    for margins in (batch["margins"], CategoryMargins(C)):
        with pytest.raises(ValueError, match=rf"margins .*loss_type='{loss_type}' would ignore it") as info:
            call(batch, loss_type=loss_type, margin=margin, margins=margins)
        assert hint in str(info.value) and "num_categories=C" in str(info.value)
        for backend in ("reference", "triton"):  # every backend: the rule is checked before dispatch
            with pytest.raises(ValueError, match=f"loss_type='{loss_type}' would ignore it"):
                call(batch, loss_type=loss_type, margin=margin, margins=margins, backend=backend)
    # num_categories sizes the stats table instead.
    out = call(batch, loss_type=loss_type, margin=margin, margins=None, num_categories=C)
    assert out.category_stats.shape == (C + 1, len(catdpo_kernels.STAT_COLUMNS))
    assert out.category_stats[:, 0].tolist() == expected_counts(batch["categories"])
    plain = call(batch, loss_type=loss_type, margin=margin, margins=None, categories=None)
    assert plain.category_stats.shape == (1, len(catdpo_kernels.STAT_COLUMNS))
    if loss_type != "safedpo":  # Δ = 0: the categories change the table, not the loss
        assert torch.equal(out.loss, plain.loss)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "catdpo"])
def test_a_scalar_margin_is_refused_by_loss_types_that_ignore_it(batch, loss_type):
    kwargs = {} if loss_type == "catdpo" else dict(margins=None, num_categories=C)
    for margin in (0.5, -1.0, 3):
        match = re.escape(f"margin={margin} ") + f".*loss_type='{loss_type}' would ignore it"
        with pytest.raises(ValueError, match=match) as info:
            call(batch, loss_type=loss_type, margin=margin, **kwargs)
        assert "read only by loss_type='safedpo'" in str(info.value)
        assert ("margins=" in str(info.value)) == (loss_type == "catdpo")  # catdpo: points to margins=
    assert torch.isfinite(call(batch, loss_type=loss_type, margin=0.0, **kwargs).loss)  # 0 is the default


def test_safedpo_reads_its_margin_and_catdpo_its_margins(batch):
    safedpo = dict(loss_type="safedpo", margins=None, num_categories=C)
    a = call(batch, margin=0.0, **safedpo).loss
    b = call(batch, margin=1.5, **safedpo).loss
    assert b > a  # the unsafe pairs get a margin to beat
    assert torch.equal(a, call(batch, loss_type="dpo", margins=None, num_categories=C).loss)
    c = call(batch, margins=batch["margins"] * 2).loss
    assert c > call(batch).loss


def test_module_follows_the_margin_rule(batch):
    data = {k: v for k, v in batch.items() if k != "margins"}
    for loss_type in ("dpo", "ipo", "catdpo"):
        with pytest.raises(ValueError, match=f"margin=0.5 .*loss_type='{loss_type}' would ignore it"):
            catdpo_kernels.CatDPOLoss(C, loss_type=loss_type, margin=0.5)
    # The module owns margins for every loss type, but passes them only to catdpo: for
    # the others they track the unsafe rate and num_categories sizes the table.
    for loss_type, margin in (("dpo", 0.0), ("ipo", 0.0), ("safedpo", 0.5)):
        module = catdpo_kernels.CatDPOLoss(C, loss_type=loss_type, margin=margin, backend="torch")
        kwargs = module.loss_kwargs()
        assert kwargs["margins"] is None and kwargs["num_categories"] == C and kwargs["margin"] == margin
        out = module(**data)
        expect = catdpo_kernels.loss(**data, loss_type=loss_type, margin=margin, num_categories=C, backend="torch")
        assert torch.equal(out.loss, expect.loss) and torch.equal(out.category_stats, expect.category_stats)
        assert out.category_stats[:, 0].tolist() == expected_counts(batch["categories"])
        assert module.update_margins() is not None  # the rates still move the margins
        with pytest.raises(ValueError, match=f"margins .*loss_type='{loss_type}' would ignore it"):
            catdpo_kernels.loss(**data, margins=module.margins, loss_type=loss_type, margin=margin)
    module = catdpo_kernels.CatDPOLoss(C, backend="torch")
    assert module.loss_kwargs()["margins"] is module.margins
    out = module(**data)
    assert torch.equal(out.loss, catdpo_kernels.loss(**data, margins=module.margins, backend="torch").loss)


# ------------------------------------------------------------------- unsafe
def test_unsafe_flags(batch):
    raises(batch, ValueError, r"unsafe.*\(2B,\)", unsafe=batch["unsafe"][:B])
    raises(batch, ValueError, r"unsafe.*\(2B,\)", unsafe=batch["unsafe"].reshape(2, -1))
    raises(batch, TypeError, "unsafe.*torch.Tensor", unsafe=[0] * (2 * B))
    raises(batch, TypeError, "unsafe", unsafe=batch["unsafe"].to(torch.complex64))
    for bad in (2, -1):
        u = batch["unsafe"].clone()
        u[0] = bad
        raises(batch, ValueError, "unsafe must hold 0/1", unsafe=u)
    u = batch["unsafe"].float()
    u[1] = 0.5
    raises(batch, ValueError, "unsafe must hold 0/1", unsafe=u)
    u[1] = float("nan")
    raises(batch, ValueError, "unsafe must hold 0/1", unsafe=u)
    # s = h_l - h_w = -1 (unsafe chosen over safe rejected) is the SafeDPO swap's job.
    u = torch.zeros(2 * B, dtype=torch.int64)
    u[1] = 1
    raises(batch, ValueError, r"unsafe marks chosen row 1 unsafe.*swap", unsafe=u)
    u[B + 1] = 1  # both unsafe: s = 0, allowed
    call(batch, unsafe=u)
    # bool, int and float 0/1 all work.
    for flags in (batch["unsafe"].bool(), batch["unsafe"].int(), batch["unsafe"].double()):
        call(batch, unsafe=flags)


# ------------------------------------------------------------------- options
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_positive_and_finite(batch, beta):
    raises(batch, ValueError, "beta.*> 0", beta=beta)


@pytest.mark.parametrize("beta", [True, "0.1", None, torch.tensor(0.1)])
def test_beta_must_be_a_number(batch, beta):
    raises(batch, TypeError, "beta must be a float", beta=beta)


def test_bad_option_strings(batch):
    raises(batch, ValueError, "loss_type must be one of", loss_type="kto")
    raises(batch, ValueError, "reduction must be one of", reduction="avg")
    raises(batch, ValueError, "backend must be one of", backend="cuda")
    raises(batch, TypeError, "ignore_index must be an int", ignore_index=-100.0)
    raises(batch, TypeError, "ignore_index must be an int", ignore_index=True)


def test_module_checks_its_options():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        catdpo_kernels.CatDPOLoss(3, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        catdpo_kernels.CatDPOLoss(3, beta=0)
    with pytest.raises(ValueError, match="catdpo.*needs num_categories or margins"):
        catdpo_kernels.CatDPOLoss()
    with pytest.raises(ValueError, match="C=2 but num_categories=3"):
        catdpo_kernels.CatDPOLoss(3, margins=CategoryMargins(2))
    with pytest.raises(TypeError, match="unexpected arguments"):
        catdpo_kernels.CatDPOLoss(margins=CategoryMargins(2), lr=0.1)


def test_inplace_backward_on_a_leaf_that_requires_grad(batch):
    leaf = batch["policy_logits"].clone().requires_grad_()
    raises(batch, ValueError, "inplace_backward", policy_logits=leaf, inplace_backward=True)


def test_inplace_backward_refuses_views_of_leaves_and_overlapping_memory(batch):
    param = batch["policy_logits"].clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward.*view of one"):
        call(batch, policy_logits=param[:, :, :V], inplace_backward=True)
    one_row = batch["policy_logits"][:1].clone().requires_grad_()
    expanded = (one_row * 1).expand(2 * B, T, V)
    with pytest.raises(ValueError, match="inplace_backward.*overlapping"):
        call(batch, policy_logits=expanded, inplace_backward=True)


def test_triton_on_cpu_without_the_interpreter_is_refused():
    """Run in a fresh interpreter: conftest.py sets TRITON_INTERPRET=1 for this process."""
    code = textwrap.dedent(
        """
        import torch, catdpo_kernels
        x = torch.randn(2, 3, 5)
        y = torch.randint(0, 5, (2, 3))
        try:
            catdpo_kernels.loss(x, y, ref_logits=torch.randn(2, 3, 5), loss_type="dpo", backend="triton")
        except ValueError as e:
            assert "backend='triton'" in str(e) and "TRITON_INTERPRET=1" in str(e), e
            print("REFUSED")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
