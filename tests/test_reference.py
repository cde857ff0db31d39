"""The naive reference against values worked out by hand: it is the ground truth of
every other test (docs/design.md, "Testing").

Most tests call ``loss(backend="reference")``; the last section calls the oracle's
own functions (``reference.catdpo_loss`` on canonical inputs, ``pair_loss``,
``category_stats``, ``category_mean``) directly.

The logits of the tiny batch are ``log(w)`` plus a per-token offset, with weights
``w`` that sum to 8 on every token, so every token log-prob is ``log(w[label] / 8)``
and every expected number below is a closed-form expression in plain Python.
"""

from __future__ import annotations

import math

import pytest
import torch

import catdpo_kernels
from catdpo_kernels import STAT_COLUMNS, reference
from catdpo_kernels.categories import CategoryAssignment
from catdpo_kernels.functional import reduce
from catdpo_kernels.loss_types import LOSS_TYPE_TABLE
from catdpo_kernels.pairs import pair_signs

K = len(STAT_COLUMNS)  # columns of the category stats table

lp = math.log
IGN = -100


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Rows 0, 1 chosen (pairs 0, 1), rows 2, 3 rejected. Weights sum to 8 per token.
W_POLICY = [
    [[1, 2, 5], [3, 3, 2]],
    [[4, 1, 3], [1, 1, 6]],
    [[2, 2, 4], [5, 2, 1]],
    [[1, 6, 1], [2, 3, 3]],
]
W_REF = [
    [[2, 2, 4], [4, 2, 2]],
    [[2, 5, 1], [1, 1, 6]],
    [[3, 3, 2], [4, 3, 1]],
    [[1, 3, 4], [2, 3, 3]],
]
LABELS = [[2, 0], [0, IGN], [1, 0], [1, 2]]
# Offsets show that the log-softmax is shift invariant per token.
OFFSETS = [[0.0, 7.0], [-3.0, 1.5], [2.0, 0.0], [0.5, -4.0]]

# Sequence log-probs by hand: sum over unmasked tokens of log(w[label] / 8).
PI = [lp(5 / 8) + lp(3 / 8), lp(4 / 8), lp(2 / 8) + lp(5 / 8), lp(6 / 8) + lp(3 / 8)]
RHO = [lp(4 / 8) + lp(4 / 8), lp(2 / 8), lp(3 / 8) + lp(4 / 8), lp(3 / 8) + lp(3 / 8)]
NTOK = [2, 1, 2, 2]


def logits_from(weights, dtype=torch.float64):
    w = torch.tensor(weights, dtype=torch.float64)
    return (w.log() + torch.tensor(OFFSETS, dtype=torch.float64).unsqueeze(-1)).to(dtype)


def tiny(**overrides):
    kw = dict(
        policy_logits=logits_from(W_POLICY).requires_grad_(),
        labels=torch.tensor(LABELS),
        ref_logits=logits_from(W_REF),
        backend="reference",
    )
    kw.update(overrides)
    return kw


def h_of(pi, rho, pair):
    return (pi[pair] - rho[pair]) - (pi[pair + 2] - rho[pair + 2])


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64).detach(),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    )


# ----------------------------------------------------------------- log-probs
def test_sequence_logps_by_hand():
    out = catdpo_kernels.loss(**tiny(), loss_type="dpo")
    close(out.policy_logps, PI)
    close(out.ref_logps, RHO)
    # A few written out as numbers, in case the closed forms above hide a slip.
    close(out.policy_logps[0], -1.4508328822574619)
    close(out.policy_logps[1], -0.6931471805599453)


def test_sequence_logps_fp32_and_half_inputs_accumulate_in_fp32():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = catdpo_kernels.loss(
            **tiny(policy_logits=logits_from(W_POLICY, dtype), ref_logits=logits_from(W_REF, dtype)), loss_type="dpo"
        )
        assert out.policy_logps.dtype == torch.float32
        assert out.loss.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 0.1
        close(out.policy_logps, PI, tol)


def test_average_log_prob_by_hand():
    out = catdpo_kernels.loss(**tiny(), loss_type="dpo", average_log_prob=True)
    close(out.policy_logps, [p / n for p, n in zip(PI, NTOK)])
    close(out.ref_logps, [r / n for r, n in zip(RHO, NTOK)])


def test_shift_labels_by_hand():
    # Reads logits[:, 0] against labels[:, 1]; row 1's only shifted label is masked.
    out = catdpo_kernels.loss(**tiny(), loss_type="dpo", shift_labels=True)
    close(out.policy_logps, [lp(1 / 8), 0.0, lp(2 / 8), lp(1 / 8)])
    close(out.ref_logps, [lp(2 / 8), 0.0, lp(3 / 8), lp(4 / 8)])


def test_shift_labels_last_position_and_masked_rows_get_no_gradient():
    kw = tiny()
    out = catdpo_kernels.loss(**kw, loss_type="dpo", shift_labels=True)
    out.loss.backward()
    g = kw["policy_logits"].grad
    assert torch.equal(g[:, -1], torch.zeros_like(g[:, -1]))
    assert torch.equal(g[1], torch.zeros_like(g[1]))  # fully masked under the shift
    assert g[0, 0].abs().sum() > 0


def test_custom_ignore_index_is_a_valid_token_id():
    # ignore_index=2: every label 2 is skipped, even though 2 < V.
    labels = torch.tensor([[2, 0], [0, 2], [1, 0], [1, 2]])
    out = catdpo_kernels.loss(**tiny(labels=labels), loss_type="dpo", ignore_index=2)
    close(out.policy_logps, [lp(3 / 8), lp(4 / 8), lp(2 / 8) + lp(5 / 8), lp(6 / 8)])


def test_fully_masked_sequence_has_zero_logp_and_zero_gradient():
    labels = torch.tensor([[2, 0], [IGN, IGN], [1, 0], [1, 2]])
    for avg in (False, True):
        kw = tiny(labels=labels)
        out = catdpo_kernels.loss(**kw, loss_type="dpo", average_log_prob=avg)
        assert out.policy_logps[1].item() == 0.0
        assert out.ref_logps[1].item() == 0.0
        out.loss.backward()
        assert torch.equal(kw["policy_logits"].grad[1], torch.zeros(2, 3, dtype=torch.float64))


# ---------------------------------------------------------------- loss types
BETA = 0.5
CATS = torch.tensor([1, -1])
MARGINS = torch.tensor([0.3, 1.7], dtype=torch.float64)
UNSAFE = torch.tensor([0, 0, 1, 0])  # pair 0: rejected unsafe -> s = 1; pair 1: s = 0
H = [h_of(PI, RHO, 0), h_of(PI, RHO, 1)]


def expected_pairs(loss_type, s, delta, beta=BETA):
    out = []
    for i in range(2):
        if loss_type == "dpo":
            out.append(softplus(-beta * H[i]))
        elif loss_type == "ipo":
            out.append((H[i] - 1 / (2 * beta)) ** 2)
        else:
            out.append(softplus(-(beta * H[i] - s[i] * delta[i])))
    return out


# Each loss type with the margin argument it reads (docs/design.md, "Math"); the
# others size the stats table with num_categories.
MARGIN_ARGS = {
    "dpo": dict(num_categories=2),
    "ipo": dict(num_categories=2),
    "safedpo": dict(num_categories=2, margin=0.8),
    "catdpo": dict(margins=MARGINS),
}


@pytest.mark.parametrize(
    "loss_type, s, delta",
    [
        ("dpo", [1, 0], [0, 0]),
        ("ipo", [1, 0], [0, 0]),
        ("safedpo", [1, 0], [0.8, 0.8]),
        ("catdpo", [1, 0], [1.7, 0.0]),  # category 1 -> Δ_1; category -1 -> Δ = 0
    ],
)
def test_loss_types_by_hand(loss_type, s, delta):
    opts = dict(categories=CATS, unsafe=UNSAFE, beta=BETA, loss_type=loss_type, reduction="none")
    out = catdpo_kernels.loss(**tiny(), **opts, **MARGIN_ARGS[loss_type])
    close(out.loss, expected_pairs(loss_type, s, delta))


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_dpo_and_ipo_ignore_categories_and_flags(loss_type):
    base = catdpo_kernels.loss(**tiny(), beta=BETA, loss_type=loss_type, reduction="none")
    with_cats = catdpo_kernels.loss(
        **tiny(), categories=CATS, unsafe=UNSAFE, num_categories=2, beta=BETA, loss_type=loss_type, reduction="none"
    )
    assert torch.equal(base.loss, with_cats.loss)
    assert base.category_stats.shape == (1, K) and with_cats.category_stats.shape == (3, K)
    close(with_cats.category_stats[:, 0], [0, 1, 1])  # pair 0 in row 1, pair 1 (id -1) in row C = 2


def test_safety_from_unsafe_flags_by_hand():
    # h_w = 0, h_l = 1 on pair 1 (no category -> Δ = 0 for catdpo, but safedpo's Δ applies);
    # pair 0 has category 1 but s = 0 - 0 = 0, so no margin.
    unsafe = torch.tensor([0, 0, 0, 1])
    cat = catdpo_kernels.loss(
        **tiny(), categories=CATS, margins=MARGINS, unsafe=unsafe, beta=BETA, loss_type="catdpo", reduction="none"
    )
    close(cat.loss, expected_pairs("catdpo", [0, 1], [1.7, 0.0]))
    opts = dict(categories=CATS, unsafe=unsafe, beta=BETA, reduction="none", loss_type="safedpo")
    safe = catdpo_kernels.loss(**tiny(), **opts, **MARGIN_ARGS["safedpo"])
    close(safe.loss, expected_pairs("safedpo", [0, 1], [0.8, 0.8]))
    # Float and bool flags mean the same.
    for flags in (unsafe.float(), unsafe.bool()):
        again = catdpo_kernels.loss(
            **tiny(), categories=CATS, margins=MARGINS, unsafe=flags, beta=BETA, loss_type="catdpo", reduction="none"
        )
        close(again.loss, cat.loss)


def test_safety_without_flags_is_one_for_pairs_with_a_category():
    cats = torch.tensor([1, 0])
    out = catdpo_kernels.loss(**tiny(), categories=cats, margins=MARGINS, beta=BETA, reduction="none")
    close(out.loss, expected_pairs("catdpo", [1, 1], [1.7, 0.3]))
    out = catdpo_kernels.loss(**tiny(), categories=torch.tensor([-1, 0]), margins=MARGINS, beta=BETA, reduction="none")
    close(out.loss, expected_pairs("catdpo", [0, 1], [0.0, 0.3]))
    # safedpo without flags: s = 1 only for pairs with a category.
    cats = torch.tensor([-1, 0])
    out = catdpo_kernels.loss(
        **tiny(), categories=cats, beta=BETA, reduction="none", loss_type="safedpo", **MARGIN_ARGS["safedpo"]
    )
    close(out.loss, expected_pairs("safedpo", [0, 1], [0.8, 0.8]))
    # No categories and no flags: plain DPO.
    out = catdpo_kernels.loss(**tiny(), beta=BETA, loss_type="safedpo", margin=0.8, reduction="none")
    close(out.loss, expected_pairs("dpo", [0, 0], [0, 0]))


def test_multi_hot_takes_the_largest_margin():
    margins = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64)
    cats = torch.tensor([[True, False, True], [False, False, False]])
    out = catdpo_kernels.loss(**tiny(), categories=cats, margins=margins, beta=BETA, reduction="none")
    close(out.loss, expected_pairs("catdpo", [1, 0], [0.9, 0.0]))
    cats = torch.tensor([[True, True, True], [False, False, True]])
    out = catdpo_kernels.loss(
        **tiny(), categories=cats, margins=margins, unsafe=torch.tensor([0, 0, 1, 1]), beta=BETA, reduction="none"
    )
    close(out.loss, expected_pairs("catdpo", [1, 1], [1.7, 0.9]))


def test_rewards_by_hand():
    out = catdpo_kernels.loss(**tiny(), categories=CATS, margins=MARGINS, beta=BETA)
    close(out.chosen_rewards, [BETA * (PI[0] - RHO[0]), BETA * (PI[1] - RHO[1])])
    close(out.rejected_rewards, [BETA * (PI[2] - RHO[2]), BETA * (PI[3] - RHO[3])])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert not out.ref_logps.requires_grad and out.policy_logps.requires_grad


def test_precomputed_ref_logps_match_ref_logits():
    a = catdpo_kernels.loss(**tiny(), categories=CATS, margins=MARGINS, beta=BETA, reduction="none")
    rho = torch.tensor(RHO, dtype=torch.float64)
    b = catdpo_kernels.loss(
        **tiny(ref_logits=None), ref_logps=rho, categories=CATS, margins=MARGINS, beta=BETA, reduction="none"
    )
    close(b.loss, a.loss)
    close(b.ref_logps, RHO)


def test_logits_gradient_by_hand():
    """∂ℓ/∂π_w = −β σ(−z), ∂ℓ/∂π_l = +β σ(−z); ∂π/∂logits = mask·(onehot − softmax)."""
    kw = tiny()
    out = catdpo_kernels.loss(**kw, categories=CATS, margins=MARGINS, unsafe=UNSAFE, beta=BETA, reduction="mean")
    out.loss.backward()
    s, delta = [1, 0], [1.7, 0.0]
    expected = torch.zeros(4, 2, 3, dtype=torch.float64)
    for pair in range(2):
        z = BETA * H[pair] - s[pair] * delta[pair]
        g = -BETA * sigmoid(-z) / 2  # mean over B = 2 pairs
        for row, sign in ((pair, 1.0), (pair + 2, -1.0)):
            for t in range(2):
                if LABELS[row][t] == IGN:
                    continue
                for v in range(3):
                    onehot = 1.0 if v == LABELS[row][t] else 0.0
                    expected[row, t, v] = sign * g * (onehot - W_POLICY[row][t][v] / 8)
    close(kw["policy_logits"].grad, expected)


def test_ipo_gradient_by_hand():
    kw = tiny()
    out = catdpo_kernels.loss(**kw, beta=BETA, loss_type="ipo", reduction="sum")
    out.loss.backward()
    # d/dπ_w (h − 1/(2β))² = 2(h − 1/(2β)); one token of row 1 (label 0, weights [4, 1, 3]).
    g = 2 * (H[1] - 1 / (2 * BETA))
    close(kw["policy_logits"].grad[1, 0], [g * (1 - 4 / 8), g * (0 - 1 / 8), g * (0 - 3 / 8)])


# --------------------------------------------------------- reductions, stats
# With V = 1 every policy log-prob is 0, so h = ρ_l − ρ_w is set by ref_logps directly.
H5 = [1.5, -0.4, 0.2, -2.0, 3.0]
CATS5 = torch.tensor([0, 2, 0, -1, 2])  # C = 3; row 1 is empty, row 3 (= C) holds pair 3
UNSAFE5 = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 0, 0])  # s = [1, 1, 1, 0, 0]
MARGINS5 = torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64)
BETA5 = 0.7


def batch5(**overrides):
    kw = dict(
        policy_logits=torch.randn(10, 1, 1, dtype=torch.float64).requires_grad_(),
        labels=torch.zeros(10, 1, dtype=torch.int64),
        ref_logps=torch.tensor([0.0] * 5 + H5, dtype=torch.float64),
        categories=CATS5,
        margins=MARGINS5,
        unsafe=UNSAFE5,
        beta=BETA5,
        backend="reference",
    )
    kw.update(overrides)
    return kw


S5 = [1, 1, 1, 0, 0]
DELTA5 = [0.5, 0.25, 0.5, 0.0, 0.25]
Z5 = [BETA5 * h - s * d for h, s, d in zip(H5, S5, DELTA5)]
L5 = [softplus(-z) for z in Z5]


def test_per_pair_loss_of_the_stats_batch():
    close(catdpo_kernels.loss(**batch5(), reduction="none").loss, L5)


def test_reductions_by_hand():
    close(catdpo_kernels.loss(**batch5(), reduction="mean").loss, sum(L5) / 5)
    close(catdpo_kernels.loss(**batch5(), reduction="sum").loss, sum(L5))
    # Active rows: 0 = {0, 2}, 2 = {1, 4}, 3 (= C) = {3}; row 1 is empty and left out.
    expected = ((L5[0] + L5[2]) / 2 + (L5[1] + L5[4]) / 2 + L5[3]) / 3
    close(catdpo_kernels.loss(**batch5(), reduction="category_mean").loss, expected)


def test_category_mean_gradient_by_hand():
    # d(category_mean)/dℓ_i = 1 / (count of i's row · number of active rows).
    pl = torch.zeros(10, 1, 2, dtype=torch.float64)
    pl[:, 0, 0] = torch.tensor([0.3, -0.1, 0.2, 0.0, 0.5, 1.0, -0.7, 0.4, 0.1, -0.2], dtype=torch.float64)
    pl.requires_grad_()
    out = catdpo_kernels.loss(**batch5(policy_logits=pl), reduction="category_mean")
    per_pair = catdpo_kernels.loss(**batch5(policy_logits=pl.detach()), reduction="none").loss
    weights = torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 3, 1 / 6], dtype=torch.float64)
    close(out.loss, (weights * per_pair).sum())
    out.loss.backward()
    expect = torch.autograd.grad(
        (weights * catdpo_kernels.loss(**batch5(policy_logits=pl), reduction="none").loss).sum(), pl
    )[0]
    close(pl.grad, expect)


def test_category_mean_without_categories_is_the_mean():
    kw = batch5(categories=None, margins=None, loss_type="dpo", unsafe=None)
    close(catdpo_kernels.loss(**kw, reduction="category_mean").loss, catdpo_kernels.loss(**kw).loss)


def test_stats_table_by_hand():
    stats = catdpo_kernels.loss(**batch5()).category_stats
    assert stats.dtype == torch.float32 and stats.shape == (4, len(STAT_COLUMNS))
    assert STAT_COLUMNS[-2:] == ("reward_acc", "reward_tie")
    rows = {0: [0, 2], 1: [], 2: [1, 4], 3: [3]}
    expected = torch.zeros(4, len(STAT_COLUMNS), dtype=torch.float64)
    for r, pairs in rows.items():
        for i in pairs:
            expected[r] += torch.tensor(
                [
                    1,
                    L5[i],
                    sigmoid(-BETA5 * H5[i]),
                    float(Z5[i] > 0),
                    BETA5 * H5[i],
                    float(H5[i] > 0),
                    float(H5[i] == 0),
                ],
                dtype=torch.float64,
            )
    close(stats, expected, 1e-6)
    # Spelled out for row 0 = pairs 0 and 2: h = 1.5 and 0.2, z = 0.55 and -0.36.
    assert stats[0, 0] == 2 and stats[0, 3] == 1 and stats[0, 5] == 2
    assert stats[3].tolist()[0] == 1 and stats[3, 3] == 0 and stats[3, 5] == 0
    assert torch.equal(stats[1], torch.zeros(len(STAT_COLUMNS)))


def test_unsafe_pref_sum_is_independent_of_the_margin():
    a = catdpo_kernels.loss(**batch5()).category_stats
    b = catdpo_kernels.loss(**batch5(margins=MARGINS5 * 3)).category_stats
    assert torch.equal(a[:, 2], b[:, 2]) and torch.equal(a[:, 4], b[:, 4]) and torch.equal(a[:, 5], b[:, 5])
    assert not torch.equal(a[:, 1], b[:, 1])


def test_multi_hot_stats_count_in_every_row_and_all_false_in_row_c():
    cats = torch.tensor(
        [[True, False, True], [False, False, False], [True, True, False], [False, False, False], [False, False, True]]
    )
    out = catdpo_kernels.loss(**batch5(categories=cats), reduction="none")
    delta = [max(0.5, 0.25), 0.0, max(0.5, 2.0), 0.0, 0.25]
    z = [BETA5 * h - s * d for h, s, d in zip(H5, S5, delta)]
    losses = [softplus(-v) for v in z]
    close(out.loss, losses)
    members = {0: [0, 2], 1: [2], 2: [0, 4], 3: [1, 3]}
    stats = out.category_stats
    for r, pairs in members.items():
        close(stats[r, 0], len(pairs))
        close(stats[r, 1], sum(losses[i] for i in pairs), 1e-6)
        close(stats[r, 4], sum(BETA5 * H5[i] for i in pairs), 1e-6)
    # A pair counted twice weighs in twice in category_mean.
    cm = catdpo_kernels.loss(**batch5(categories=cats), reduction="category_mean").loss
    close(cm, sum(sum(losses[i] for i in p) / len(p) for p in members.values()) / 4)


def test_multi_hot_without_flags_has_s_one_for_any_category():
    cats = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]]).bool()
    out = catdpo_kernels.loss(**batch5(categories=cats, unsafe=None), reduction="none")
    s = [1, 0, 1, 0, 1]
    delta = [0.5, 0.0, 2.0, 0.0, 0.25]
    close(out.loss, [softplus(-(BETA5 * h - si * d)) for h, si, d in zip(H5, s, delta)])


def test_no_categories_all_pairs_in_row_c():
    stats = catdpo_kernels.loss(**batch5(categories=None, margins=None, loss_type="dpo")).category_stats
    assert stats.shape == (1, K)
    close(stats[0, 0], 5)
    close(stats[0, 1], sum(softplus(-BETA5 * h) for h in H5), 1e-6)
    stats = catdpo_kernels.loss(**batch5(categories=None, num_categories=3)).category_stats
    assert stats.shape == (4, K) and stats[3, 0] == 5 and stats[:3].abs().sum() == 0


def test_out_of_range_label_gives_nan_with_checks_off():
    labels = torch.tensor([[2, 3], [0, IGN], [1, 0], [1, 2]])  # 3 >= V
    out = catdpo_kernels.loss(**tiny(labels=labels), loss_type="dpo", check_inputs=False, reduction="none")
    assert torch.isnan(out.policy_logps[0]) and torch.isfinite(out.policy_logps[1:]).all()
    assert torch.isnan(out.loss[0]) and torch.isfinite(out.loss[1])


def test_out_of_range_category_gives_nan_with_checks_off():
    out = catdpo_kernels.loss(**batch5(categories=torch.tensor([0, 3, 0, -1, 2])), check_inputs=False, reduction="none")
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2, 3, 4]]).all()
    for reduction in ("mean", "sum", "category_mean"):
        bad = catdpo_kernels.loss(
            **batch5(categories=torch.tensor([0, 3, 0, -1, 2])), check_inputs=False, reduction=reduction
        )
        assert torch.isnan(bad.loss), reduction


# The margin argument each loss type reads, for the 5-pair batch (C = 3).
MARGIN_ARGS5 = {
    "dpo": dict(margins=None, num_categories=3),
    "ipo": dict(margins=None, num_categories=3),
    "safedpo": dict(margins=None, num_categories=3, margin=0.4),
    "catdpo": dict(),
}


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "safedpo"])
def test_out_of_range_category_poisons_category_mean_for_every_loss_type(loss_type):
    # These loss types do not read Δ_c, but category_mean does group by category.
    for bad_id in (3, -2):
        cats = torch.tensor([0, bad_id, 0, -1, 2])
        kw = batch5(categories=cats, loss_type=loss_type, **MARGIN_ARGS5[loss_type])
        out = catdpo_kernels.loss(**kw, check_inputs=False, reduction="category_mean")
        assert torch.isnan(out.loss), (loss_type, bad_id)
        # The pair counts in no stats row.
        assert out.category_stats[:, 0].tolist() == [2, 0, 1, 1]
        per_pair = catdpo_kernels.loss(**kw, check_inputs=False, reduction="none").loss
        assert torch.isnan(per_pair[1]) and torch.isfinite(per_pair[[0, 2, 3, 4]]).all()


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "safedpo", "catdpo"])
def test_invalid_unsafe_flags_give_nan_with_checks_off(loss_type):
    # Pairs 1..4: a flag of 2, a flag of 0.5, a NaN flag and an unsafe chosen over a
    # safe rejected response (s = -1); pair 0 is valid.
    unsafe = torch.tensor([0, 2, 0, float("nan"), 1, 1, 1, 0.5, 1, 0], dtype=torch.float64)
    kw = batch5(unsafe=unsafe, loss_type=loss_type, **MARGIN_ARGS5[loss_type])
    out = catdpo_kernels.loss(**kw, check_inputs=False, reduction="none")
    assert torch.isfinite(out.loss[0]) and torch.isnan(out.loss[1:]).all()
    # The pairs still count in their stats rows (with NaN sums).
    close(out.category_stats[:, 0], [2, 0, 2, 1])


# ------------------------------------------------- the oracle's own functions
def test_catdpo_loss_on_canonical_inputs_by_hand():
    a = CategoryAssignment.from_categories(CATS, 2, 2, torch.device("cpu"))
    table = a.margin_table(LOSS_TYPE_TABLE["catdpo"], MARGINS, 0.0)
    signs = pair_signs(UNSAFE, a)
    close(signs, [1, 0])
    kw = dict(ref_logits=logits_from(W_REF), beta=BETA)
    loss, policy, ref, stats = reference.catdpo_loss(logits_from(W_POLICY), torch.tensor(LABELS), a, table, signs, **kw)
    close(policy, PI)
    close(ref, RHO)
    expected = expected_pairs("catdpo", [1, 0], [1.7, 0.0])
    close(loss, expected)
    # Pair 0 (category 1) in row 1, pair 1 (no category) in row C = 2; row 0 is empty.
    assert stats.dtype == torch.float32 and stats.shape == (3, len(STAT_COLUMNS))
    for row, pair in ((1, 0), (2, 1)):
        close(stats[row, [0, 1, 2, 4]], [1, expected[pair], sigmoid(-BETA * H[pair]), BETA * H[pair]], 1e-6)
    # The indicators of pair 0 (pair 1 has h = 0 up to rounding: no stable sign).
    assert BETA * H[0] - 1.7 < 0 < H[0]
    assert stats[1, 3] == 0 and stats[1, 5] == 1
    assert torch.equal(stats[0], torch.zeros(len(STAT_COLUMNS)))
    # The same with precomputed reference log-probs, and the IPO family.
    rho = torch.tensor(RHO, dtype=torch.float64)
    labels = torch.tensor(LABELS)
    again = reference.catdpo_loss(logits_from(W_POLICY), labels, a, table, signs, ref_logps=rho, beta=BETA)
    close(again[0], expected)
    ipo = reference.catdpo_loss(logits_from(W_POLICY), labels, a, table, signs, family="ipo", **kw)
    close(ipo[0], expected_pairs("ipo", [1, 0], [0, 0]))


@pytest.mark.parametrize("family", ["sigmoid", "ipo"])
def test_pair_loss_formulas_by_hand(family):
    policy = torch.tensor([-1.0, -2.5, -3.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -2.0, -1.0], dtype=torch.float64)
    signs = torch.tensor([1.0, float("nan")])
    delta = torch.tensor([0.6, 0.3], dtype=torch.float64)
    beta = 0.4
    h = [(-1.0 + 1.5) - (-3.0 + 2.0), (-2.5 + 2.0) - (-0.5 + 1.0)]  # [1.5, -1.0]
    loss, h_out, z_out = reference.pair_loss(policy, ref, signs, delta, beta=beta, family=family)
    close(h_out, h)
    close(z_out[0], beta * h[0] - 0.6)
    expected0 = softplus(-(beta * h[0] - 0.6)) if family == "sigmoid" else (h[0] - 1 / (2 * beta)) ** 2
    close(loss[0], expected0)
    assert torch.isnan(loss[1])  # a NaN sign poisons the pair in every family
    bad_delta = torch.tensor([0.6, float("nan")])
    loss, _, _ = reference.pair_loss(policy, ref, torch.ones(2), bad_delta, beta=beta, family=family)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])  # so does a NaN margin (the invalid row)
    assert set(reference.PAIR_FORMULAS) == {spec.family for spec in LOSS_TYPE_TABLE.values()}


def test_category_stats_and_category_mean_by_hand():
    values = torch.tensor([[1.0, 2.0], [1.0, 5.0], [1.0, -1.0], [1.0, 7.0]], dtype=torch.float64)
    # Pair 0 in rows 0 and 2, pair 1 in row 2, pair 2 in row 0, pair 3 in no row (invalid); row 1 empty.
    member = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float64)
    table = reference.category_stats(values, member)
    assert table.dtype == torch.float32
    close(table, [[2, 1], [0, 0], [2, 7]])
    loss = torch.tensor([0.5, 1.5, 2.5, 9.0], dtype=torch.float64, requires_grad=True)
    valid = member[:3]
    # Row means: row 0 (0.5 + 2.5) / 2 = 1.5, row 2 (0.5 + 1.5) / 2 = 1.0; the empty row is left out.
    cm = reference.category_mean(loss[:3], valid)
    close(cm, (1.5 + 1.0) / 2)
    cm.backward()
    close(loss.grad, [(1 / 2 + 1 / 2) / 2, 1 / 4, 1 / 4, 0])
    assert torch.isnan(reference.category_mean(loss.detach(), member))  # pair 3 counts nowhere


def _random_assignment(kind: str, num_pairs: int, num_cats: int, gen: torch.Generator) -> CategoryAssignment:
    if kind == "multi_hot":
        cats = torch.rand(num_pairs, num_cats, generator=gen) < 0.35
    else:
        cats = torch.randint(-1, num_cats, (num_pairs,), generator=gen)
        if kind == "invalid":
            cats[int(torch.randint(0, num_pairs, (1,), generator=gen))] = num_cats + 2
    return CategoryAssignment.from_categories(cats, num_cats, num_pairs, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["ids", "multi_hot", "invalid"])
@pytest.mark.parametrize("num_pairs, num_cats", [(1, 1), (5, 3), (33, 7), (64, 19)])
def test_functional_category_mean_matches_the_oracle(kind, num_pairs, num_cats):
    gen = torch.Generator().manual_seed(num_pairs * 100 + num_cats)
    for _ in range(3):
        a = _random_assignment(kind, num_pairs, num_cats, gen)
        member = a.membership(torch.float64)
        table = reference.category_stats(torch.ones(num_pairs, len(STAT_COLUMNS)), member)
        loss = (torch.rand(num_pairs, generator=gen, dtype=torch.float64) * 3).requires_grad_()
        fused = reduce(loss, table, a, "category_mean")
        oracle = reference.category_mean(loss, member)
        if kind == "invalid":
            assert torch.isnan(fused) and torch.isnan(oracle)
            continue
        close(fused, oracle)
        (g_fused,) = torch.autograd.grad(fused, loss)
        (g_oracle,) = torch.autograd.grad(oracle, loss)
        close(g_fused, g_oracle)
    close(reduce(loss, table, a, "mean"), loss.mean())
    close(reduce(loss, table, a, "sum"), loss.sum())
    assert reduce(loss, table, a, "none") is loss
