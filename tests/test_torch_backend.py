"""``backend="torch"`` (chunked custom autograd) against the float64 reference.

Criterion (DESIGN.md §4): the torch backend's error vs float64 is no worse than
the naive reference's error in the same dtype, plus a small tolerance.
"""

from __future__ import annotations

import pytest
import torch
from _utils import (
    IGNORE_INDEX,
    assert_backend_matches_reference,
    assert_close_to_exact,
    float64_reference,
    make_batch,
    run_loss,
)

import catdpo_kernels
from catdpo_kernels import LOSS_TYPES, REDUCTIONS
from catdpo_kernels.ops import sequence_logps_torch as slt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTS = dict(beta=0.1, margin=0.7)


def check(batch, **opts):
    return assert_backend_matches_reference(batch, backend="torch", **{**OPTS, **opts})


# ------------------------------------------------------------- shapes, dtypes
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "B, T, V",
    [(1, 1, 1), (1, 1, 7), (1, 4, 1), (2, 3, 37), (3, 2, 130), (1, 9, 1000)],
    ids=lambda v: str(v),
)
def test_odd_shapes_and_dtypes(B, T, V, dtype):
    batch = make_batch(B, T, V, 3, dtype, seed=B * 1000 + T * 10 + V)
    fused, grad, _, _ = check(batch)
    assert fused.policy_logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if V == 1:  # log_softmax of one logit is 0: no log-prob, no gradient
        assert torch.equal(fused.policy_logps, torch.zeros_like(fused.policy_logps))
        assert torch.equal(grad, torch.zeros_like(grad))


# Every loss type x every reduction; the dtype rotates so that each dtype meets
# every loss type and every reduction (the full cube would triple the runtime).
GRID = [
    (lt, red, DTYPES[(i + j) % len(DTYPES)]) for i, lt in enumerate(LOSS_TYPES) for j, red in enumerate(REDUCTIONS)
]


@pytest.mark.parametrize("loss_type, reduction, dtype", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_every_loss_type_and_reduction(loss_type, reduction, dtype):
    seed = LOSS_TYPES.index(loss_type) * 10 + REDUCTIONS.index(reduction)
    batch = make_batch(4, 3, 61, 3, dtype, seed=seed)
    fused, _, _, _ = check(batch, loss_type=loss_type, reduction=reduction)
    assert fused.loss.shape == ((4,) if reduction == "none" else ())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("shift_labels", [False, True])
def test_shift_labels_and_average_log_prob(shift_labels, average_log_prob, dtype):
    batch = make_batch(2, 6, 50, 2, dtype, seed=7, shift=shift_labels, masked_frac=0.4)
    _, grad, _, _ = check(batch, shift_labels=shift_labels, average_log_prob=average_log_prob)
    if shift_labels:
        assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_index", [-1, 0, 5])
def test_custom_ignore_index(ignore_index, dtype):
    # 0 and 5 are valid token ids: every such label is skipped, not scored.
    batch = make_batch(2, 6, 9, 2, dtype, seed=11, ignore_index=ignore_index, masked_frac=0.3)
    check(batch, ignore_index=ignore_index)
    default = make_batch(2, 6, 9, 2, dtype, seed=11, masked_frac=0.3)
    assert not torch.equal(batch["labels"], default["labels"]) or ignore_index == IGNORE_INDEX


@pytest.mark.parametrize("dtype", DTYPES)
def test_precomputed_ref_logps(dtype):
    batch = make_batch(3, 4, 33, 3, dtype, seed=5)
    ref = catdpo_kernels.loss(**batch, backend="reference").ref_logps
    batch = {**batch, "ref_logits": None, "ref_logps": ref}
    fused, _, _, _ = check(batch, loss_type="catdpo", reduction="category_mean")
    assert torch.equal(fused.ref_logps, ref)
    ref_logits = make_batch(3, 4, 33, 3, dtype, seed=5)["ref_logits"]
    with_logits, _ = run_loss({**batch, "ref_logps": None, "ref_logits": ref_logits}, backend="torch",
                              loss_type="catdpo", reduction="category_mean", **OPTS)  # fmt: skip
    torch.testing.assert_close(fused.loss, with_logits.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_unsafe", [False, True])
def test_multi_hot_categories(with_unsafe, dtype):
    batch = make_batch(6, 3, 40, 4, dtype, seed=13, multi_hot=True, with_unsafe=with_unsafe)
    for reduction in ("mean", "category_mean"):
        fused, _, _, _ = check(batch, reduction=reduction)
    assert fused.category_stats.shape == (5, 6)
    assert fused.category_stats[:, 0].sum() >= 6  # multi-hot pairs count in several rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_categories_plain_dpo(dtype):
    batch = make_batch(3, 4, 20, 1, dtype, seed=17)
    batch = {**batch, "categories": None, "margins": None, "unsafe": None}
    for loss_type in ("dpo", "ipo", "safedpo"):
        fused, _, _, _ = check(batch, loss_type=loss_type)
        assert fused.category_stats.shape == (1, 6) and fused.category_stats[0, 0] == 3


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shift", [False, True])
def test_fully_masked_sequences_have_zero_logp_and_zero_gradient(shift, dtype):
    batch = make_batch(3, 5, 23, 2, dtype, seed=19, fully_masked_rows=(1, 4), shift=shift)
    for avg in (False, True):
        fused, grad, _, _ = check(batch, shift_labels=shift, average_log_prob=avg)
        assert fused.policy_logps[1].item() == 0.0 and fused.policy_logps[4].item() == 0.0
        assert fused.ref_logps[1].item() == 0.0 and fused.ref_logps[4].item() == 0.0
        assert torch.equal(grad[[1, 4]], torch.zeros_like(grad[[1, 4]]))
        assert grad[0].abs().sum() > 0


# ------------------------------------------------------------- strides, chunks
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_logits_wider_vocab_buffer(dtype):
    batch = make_batch(2, 5, 31, 3, dtype, seed=23, non_contiguous=True)
    assert not batch["policy_logits"].is_contiguous() and batch["policy_logits"].stride(-1) == 1
    _, grad, _, _ = check(batch, shift_labels=True)
    contiguous = {**batch, "policy_logits": batch["policy_logits"].contiguous(),
                  "ref_logits": batch["ref_logits"].contiguous()}  # fmt: skip
    _, grad_c = run_loss(contiguous, backend="torch", shift_labels=True, **OPTS)
    assert torch.equal(grad, grad_c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_logits_row_slice(dtype):
    wide = make_batch(4, 3, 29, 3, dtype, seed=29)
    batch = make_batch(2, 3, 29, 3, dtype, seed=31)
    batch["policy_logits"] = wide["policy_logits"][::2]
    batch["ref_logits"] = wide["ref_logits"][1::2]
    assert not batch["policy_logits"].is_contiguous()
    check(batch)
    check(batch, shift_labels=True, average_log_prob=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "chunk, T, V",
    [
        (100, 9, 37),  # 2 tokens per block: every row split over 5 blocks, the last one short
        (37 * 3, 7, 37),  # 3 tokens per block: 3 + 3 + 1
        (10, 4, 37),  # budget below V: one token per block
        (37 * 12, 3, 37),  # 4 rows of 3 tokens per block, 2 blocks for 8 rows
        (37 * 7, 3, 37),  # 2 rows per block, rows never split
    ],
)
def test_blocks_across_the_chunk_boundary(monkeypatch, chunk, T, V, dtype):
    batch = make_batch(4, T, V, 3, dtype, seed=chunk, masked_frac=0.3)
    variants = (dict(), dict(shift_labels=True, average_log_prob=True))
    unchunked = [run_loss(batch, backend="torch", **opts, **OPTS) for opts in variants]
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", chunk)
    assert len(list(slt.token_blocks(8, T, V))) > 1
    for opts, (out_default, grad_default) in zip(variants, unchunked):
        out, grad, _, _ = check(batch, **opts)
        # Per token the math is the same in any blocking; only the order of the
        # fp32 sums over a split row may differ.
        torch.testing.assert_close(out.policy_logps, out_default.policy_logps, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad, grad_default, atol=1e-7, rtol=1e-5)


def test_token_blocks_cover_the_grid_exactly_once():
    for budget, rows, tokens, vocab in [(100, 3, 9, 37), (10, 2, 4, 37), (37 * 12, 8, 3, 37), (1 << 21, 5, 1, 1)]:
        seen = torch.zeros(rows, tokens, dtype=torch.int64)
        for rs, ts in slt.token_blocks(rows, tokens, vocab, budget):
            seen[rs, ts] += 1
            n = (rs.stop - rs.start) * (ts.stop - ts.start)
            assert n * vocab <= max(budget, vocab), (budget, rs, ts)
        assert torch.equal(seen, torch.ones_like(seen)), (budget, rows, tokens, vocab)


# ------------------------------------------------------------- inplace backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_labels", [False, True])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(shift_labels, dtype, monkeypatch):
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 41 * 3)  # several blocks
    batch = make_batch(2, 6, 41, 3, dtype, seed=37, shift=shift_labels)
    _, normal = run_loss(batch, backend="torch", shift_labels=shift_labels, reduction="none", **OPTS)

    base = batch["policy_logits"].clone().requires_grad_()
    logits = base * 1.0  # a non-leaf buffer, like an lm_head output
    kwargs = {**batch, "policy_logits": logits}
    out = catdpo_kernels.loss(**kwargs, backend="torch", inplace_backward=True, shift_labels=shift_labels,
                              reduction="none", **OPTS)  # fmt: skip
    out.loss.backward(torch.linspace(0.5, 1.5, 2, dtype=torch.float64).to(out.loss.dtype))
    assert torch.equal(base.grad, normal)
    assert torch.equal(logits.detach(), normal)  # the buffer now holds the gradient


def test_inplace_backward_refuses_a_leaf_that_requires_grad():
    batch = make_batch(1, 3, 8, 2, seed=41)
    leaf = batch["policy_logits"].requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        catdpo_kernels.loss(**batch, backend="torch", inplace_backward=True)
    assert leaf.grad is None


# ------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_runs_are_bitwise_identical(dtype, monkeypatch):
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 97 * 4)
    batch = make_batch(3, 11, 97, 4, dtype, seed=43, multi_hot=True)
    first, g_first = run_loss(batch, backend="torch", reduction="category_mean", **OPTS)
    for _ in range(2):
        again, g_again = run_loss(batch, backend="torch", reduction="category_mean", **OPTS)
        for field in first._fields:
            assert torch.equal(getattr(first, field), getattr(again, field)), field
        assert torch.equal(g_first, g_again)


# ------------------------------------------------------------- gradcheck
@pytest.mark.parametrize(
    "opts",
    [
        dict(loss_type="catdpo", reduction="category_mean", shift_labels=True),
        dict(loss_type="ipo", reduction="none", average_log_prob=True),
        dict(loss_type="safedpo", reduction="sum", margin=0.4, shift_labels=True, average_log_prob=True),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_gradcheck_float64(opts, monkeypatch):
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 4 * 2)  # blocks of 2 tokens: rows split
    batch = make_batch(2, 3, 4, 3, torch.float64, seed=47, masked_frac=0.3, fully_masked_rows=(3,))
    x = batch.pop("policy_logits").clone().requires_grad_()
    opts = {"beta": 0.5, **opts}

    def fn(logits):
        out = catdpo_kernels.loss(logits, **batch, backend="torch", **opts)
        return out.loss, out.policy_logps

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------- autocast, checks off
def test_autocast_gives_the_same_result():
    batch = make_batch(2, 4, 30, 3, seed=53)
    plain, g_plain = run_loss(batch, backend="torch", **OPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, g_auto = run_loss(batch, backend="torch", **OPTS)
    for field in plain._fields:
        assert getattr(auto, field).dtype == getattr(plain, field).dtype, field
        assert torch.equal(getattr(auto, field), getattr(plain, field)), field
    assert torch.equal(g_auto, g_plain)


@pytest.mark.parametrize("bad_label", [40, -5])
def test_checks_off_out_of_range_label_gives_nan(bad_label):
    batch = make_batch(2, 4, 40, 3, seed=59)
    batch["labels"][1, 2] = bad_label
    with pytest.raises(ValueError, match="labels"):
        catdpo_kernels.loss(**batch, backend="torch")
    out, grad = run_loss(batch, backend="torch", check_inputs=False, reduction="none", **OPTS)
    assert torch.isnan(out.policy_logps[1]) and torch.isfinite(out.policy_logps[[0, 2, 3]]).all()
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[0])
    mean, _ = run_loss(batch, backend="torch", check_inputs=False, **OPTS)
    assert torch.isnan(mean.loss)
    exact, _ = float64_reference(**batch, check_inputs=False, reduction="none", **OPTS)
    assert_close_to_exact(out.loss, exact.loss, atol=1e-5, rtol=1e-5, name="loss with a NaN pair")


@pytest.mark.parametrize("bad_cat", [3, -2])
def test_checks_off_out_of_range_category_gives_nan(bad_cat):
    batch = make_batch(3, 4, 20, 3, seed=61)
    batch["categories"][1] = bad_cat
    with pytest.raises(ValueError, match="categories"):
        catdpo_kernels.loss(**batch, backend="torch")
    for reduction in ("mean", "category_mean"):
        out, _ = run_loss(batch, backend="torch", check_inputs=False, reduction=reduction, **OPTS)
        assert torch.isnan(out.loss), reduction
    dpo, _ = run_loss(batch, backend="torch", check_inputs=False, reduction="category_mean", loss_type="dpo", **OPTS)
    assert torch.isnan(dpo.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 60.0])
def test_large_logits_keep_the_naive_accuracy(offset, dtype):
    """LLM-sized logits (spread ~20, |max| up to ~100): one rounded fp32 ``max + log-sum``
    would cost up to half an ulp of |max| in every token log-prob and softmax entry, and
    the target entry g·(1 − p) of the gradient would carry it tenfold versus log_softmax."""
    batch = make_batch(3, 7, 129, 3, dtype, seed=67, scale=20.0)
    for key in ("policy_logits", "ref_logits"):
        batch[key] = batch[key] + offset
    check(batch, beta=1.0)
    check(batch, beta=1.0, shift_labels=True, average_log_prob=True, reduction="none")
