"""The category rule (``CategoryAssignment``) and the signs (``pair_signs``) against
tensors written out by hand (docs/design.md, "Categories").

With ``C`` categories the stats rows are ``0 … C−1``, row ``C`` ("no category") and,
for ids only, the invalid row ``C + 1`` that counts nowhere and poisons the loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from catdpo_kernels.categories import CategoryAssignment
from catdpo_kernels.constants import NUM_STATS
from catdpo_kernels.loss_types import LOSS_TYPE_TABLE
from catdpo_kernels.ops.category_stats import category_mean_weights, category_table
from catdpo_kernels.ops.segment_reduce import compiled_op_available, segment_reduce, segment_reduce_torch
from catdpo_kernels.pairs import PairInputs, pair_signs

CPU = torch.device("cpu")
NAN = float("nan")
C = 3
# ids: a real category, another, none, two out of range below and at C, and category 1.
IDS = torch.tensor([0, 2, -1, -2, 3, 1])
ROWS = [0, 2, 3, 4, 4, 1]
HOT = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
MEMBER = [[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]]


def ids_assignment(ids=IDS, c=C):
    return CategoryAssignment.from_categories(ids, c, ids.shape[0], CPU)


def hot_assignment(hot=HOT):
    return CategoryAssignment.from_categories(hot, hot.shape[1], hot.shape[0], CPU)


def equal(actual: torch.Tensor, expected) -> None:
    """Exact equality, NaN where ``expected`` has NaN, same dtype as ``expected`` if it is a tensor."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    assert torch.equal(actual.nan_to_num(-123.0), expected.nan_to_num(-123.0)), (actual, expected)


# ------------------------------------------------------------ from_categories
def test_ids_map_to_rows_and_out_of_range_to_the_invalid_row():
    a = ids_assignment()
    assert a.num_categories == C and a.num_pairs == 6 and a.none_row == C and not a.multi_hot
    assert a.member is None and a.rows.dtype == torch.int64
    equal(a.rows, ROWS)
    equal(a.invalid(), [False, False, False, True, True, False])
    equal(a.has_category(), [True, True, False, False, False, True])
    one_hot = [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    equal(a.membership(), torch.tensor(one_hot, dtype=torch.float64))  # invalid pairs count in no row
    assert a.membership(torch.float32).dtype == torch.float32


def test_int32_and_huge_ids():
    a = ids_assignment(torch.tensor([1, -1, 2**31 - 1, -(2**31)], dtype=torch.int32))
    equal(a.rows, [1, 3, 4, 4])
    equal(ids_assignment(torch.tensor([2**40, -(2**40), 0])).rows, [4, 4, 0])


def test_multi_hot_gets_an_explicit_no_category_column():
    a = hot_assignment()
    assert a.multi_hot and a.rows is None and a.num_categories == C and a.num_pairs == 3
    equal(a.member, torch.tensor(MEMBER, dtype=torch.bool))
    assert a.invalid() is None  # a bool matrix cannot hold an out-of-range category
    equal(a.has_category(), [True, False, True])
    equal(a.membership(), torch.tensor(MEMBER, dtype=torch.float64))


def test_no_categories_puts_every_pair_in_row_c():
    a = CategoryAssignment.from_categories(None, C, 4, CPU)
    equal(a.rows, [C] * 4)
    equal(a.invalid(), [False] * 4)
    equal(a.has_category(), [False] * 4)
    equal(a.membership(), torch.tensor([[0, 0, 0, 1]] * 4, dtype=torch.float64))


def test_zero_categories():
    a = CategoryAssignment.from_categories(None, 0, 2, CPU)
    equal(a.rows, [0, 0])
    assert a.none_row == 0
    equal(a.membership(), torch.ones(2, 1, dtype=torch.float64))
    b = ids_assignment(torch.tensor([-1, 0, 5]), c=0)  # with C = 0 only -1 is valid
    equal(b.rows, [0, 1, 1])
    equal(b.invalid(), [False, True, True])
    hot = hot_assignment(torch.zeros(2, 0, dtype=torch.bool))
    equal(hot.member, torch.ones(2, 1, dtype=torch.bool))
    equal(hot.has_category(), [False, False])


def test_the_assignment_is_frozen():
    a = ids_assignment()
    with pytest.raises(AttributeError):
        a.rows = torch.zeros(6, dtype=torch.int64)


# ------------------------------------------------------------ margins
MARGINS = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def test_margin_table_for_each_margin_kind():
    a = ids_assignment()
    for loss_type, margins, margin, expected in [
        ("catdpo", MARGINS, 0.0, [0.5, 1.0, 2.0, 0.0, NAN]),  # [Δ_0 … Δ_{C−1}, Δ_none = 0, invalid]
        ("safedpo", None, 0.8, [0.8, 0.8, 0.8, 0.8, NAN]),  # one Δ for every pair, none included
        ("dpo", None, 0.0, [0.0, 0.0, 0.0, 0.0, NAN]),
        ("ipo", None, 0.0, [0.0, 0.0, 0.0, 0.0, NAN]),
    ]:
        table = a.margin_table(LOSS_TYPE_TABLE[loss_type], margins, margin)
        assert table.dtype == torch.float64, loss_type  # exact; each pair stage casts to its own dtype
        equal(table, expected)


def test_margin_table_detaches_the_margins_and_handles_c_zero():
    margins = MARGINS.clone().requires_grad_()
    table = ids_assignment().margin_table(LOSS_TYPE_TABLE["catdpo"], margins, 0.0)
    assert not table.requires_grad
    none = CategoryAssignment.from_categories(None, 0, 2, CPU)
    equal(none.margin_table(LOSS_TYPE_TABLE["catdpo"], torch.zeros(0), 0.0), [0.0, NAN])
    equal(none.margin_table(LOSS_TYPE_TABLE["safedpo"], None, 0.3), [0.3, NAN])
    equal(none.margin_table(LOSS_TYPE_TABLE["dpo"], None, 0.0), [0.0, NAN])


def test_pair_margins_gather_by_row():
    a = ids_assignment()
    table = a.margin_table(LOSS_TYPE_TABLE["catdpo"], MARGINS, 0.0)
    equal(a.pair_margins(table), [0.5, 2.0, 0.0, NAN, NAN, 1.0])
    scalar = a.margin_table(LOSS_TYPE_TABLE["safedpo"], None, 0.8)
    equal(a.pair_margins(scalar), [0.8, 0.8, 0.8, NAN, NAN, 0.8])


def test_pair_margins_of_multi_hot_take_the_largest():
    a = hot_assignment()
    table = a.margin_table(LOSS_TYPE_TABLE["catdpo"], MARGINS, 0.0)
    equal(a.pair_margins(table), [2.0, 0.0, 1.0])  # max(Δ_0, Δ_2); no category; Δ_1
    # The largest of the pair's own margins, even when all are negative (not Δ_none = 0).
    negative = a.margin_table(LOSS_TYPE_TABLE["catdpo"], torch.tensor([-1.0, -3.0, -2.0]), 0.0)
    equal(a.pair_margins(negative), [-1.0, 0.0, -3.0])
    two = hot_assignment(torch.tensor([[True, True, False]]))
    negative = two.margin_table(LOSS_TYPE_TABLE["catdpo"], torch.tensor([-1.0, -3.0, -2.0]), 0.0)
    equal(two.pair_margins(negative), [-1.0])


# ------------------------------------------------------------ gather, segments
def test_gather_sums_the_rows_of_each_pair_and_gives_nan_for_invalid_pairs():
    per_row = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    equal(ids_assignment().gather(per_row), [1.0, 100.0, 1000.0, NAN, NAN, 10.0])
    equal(hot_assignment().gather(per_row), [101.0, 1000.0, 10.0])


def test_segment_ids_give_c_plus_one_ordinary_segments():
    ids, n = ids_assignment().segment_ids()
    assert n == C + 1
    equal(ids, ROWS)
    member, n = hot_assignment().segment_ids()
    assert n == C + 1 and member.dtype == torch.bool
    equal(member, torch.tensor(MEMBER, dtype=torch.bool))


SEGMENT_IMPLS = [
    pytest.param("compiled", marks=pytest.mark.skipif(not compiled_op_available("cpu"), reason="no compiled op")),
    "fallback",
    "entry",
]


def _table(impl, values, assignment):
    ids, n = assignment.segment_ids()
    if impl == "compiled":
        out = torch.ops.catdpo.segment_reduce(values, ids, n)
    elif impl == "fallback":
        out = segment_reduce_torch(values, ids, n)
    else:
        out = segment_reduce(values, ids, n)
    assert out.shape == (C + 2, values.shape[1])
    # The op's own "none" row (for id -1) stays empty: canonical rows never use it.
    assert torch.equal(out[C + 1], torch.zeros(values.shape[1]))
    return out[: C + 1]


@pytest.mark.parametrize("impl", SEGMENT_IMPLS)
def test_segment_reduce_of_canonical_ids_by_hand(impl):
    values = torch.arange(6 * NUM_STATS, dtype=torch.float32).reshape(6, NUM_STATS)
    values[3] = NAN  # an invalid pair's row: counts nowhere, so its NaN reaches no row
    expected = torch.stack([values[0], values[5], values[1], values[2]])  # rows 0, 1, 2 and C
    equal(_table(impl, values, ids_assignment()), expected)
    equal(category_table(values, ids_assignment()), expected)


@pytest.mark.parametrize("impl", SEGMENT_IMPLS)
def test_segment_reduce_of_multi_hot_by_hand(impl):
    values = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    expected = [[1.0, 2.0], [100.0, 200.0], [1.0, 2.0], [10.0, 20.0]]  # pair 0 in rows 0 and 2
    equal(_table(impl, values, hot_assignment()), expected)


def test_category_table_is_fp32_c_plus_one_rows_and_gather_is_its_adjoint():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(6, NUM_STATS, generator=gen, dtype=torch.float64)
    hot = hot_assignment(torch.rand(6, C, generator=gen) < 0.5)
    for a in (hot, ids_assignment(torch.tensor([0, 2, -1, 1, 1, -1]))):
        table = category_table(values, a)
        assert table.dtype == torch.float32 and table.shape == (C + 1, NUM_STATS)
        g = torch.randn(C + 1, generator=gen, dtype=torch.float64)
        # <g, segment sum of v> == <gather(g), v>, column by column.
        lhs = (g[:, None] * table.double()).sum(0)
        torch.testing.assert_close(lhs, (a.gather(g)[:, None] * values).sum(0), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------ category_mean weights
def test_category_mean_weights_by_hand():
    a = ids_assignment(torch.tensor([0, 2, -1, 2]))
    counts = torch.tensor([1.0, 0.0, 2.0, 1.0])  # 3 active rows; row 1 is empty
    equal(category_mean_weights(counts, a), torch.tensor([1 / 3, 1 / 6, 1 / 3, 1 / 6], dtype=torch.float64))
    bad = ids_assignment(torch.tensor([0, 7, -1, 2]))
    w = category_mean_weights(torch.tensor([1.0, 0.0, 1.0, 1.0]), bad)
    assert torch.isnan(w[1]) and torch.isfinite(w[[0, 2, 3]]).all()
    hot = hot_assignment()  # rows 0: {0}, 1: {2}, 2: {0}, C: {1}
    w = category_mean_weights(torch.tensor([1.0, 1.0, 1.0, 1.0]), hot)
    equal(w, torch.tensor([1 / 4 + 1 / 4, 1 / 4, 1 / 4], dtype=torch.float64))
    assert math.isclose(float(w.sum()), 1.0)


# ------------------------------------------------------------ signs
def test_signs_without_flags_are_one_for_pairs_with_a_category():
    equal(pair_signs(None, ids_assignment()), torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.float32))
    equal(pair_signs(None, hot_assignment()), torch.tensor([1, 0, 1], dtype=torch.float32))
    equal(pair_signs(None, CategoryAssignment.from_categories(None, C, 2, CPU)), torch.zeros(2))


def test_signs_from_flags_are_h_l_minus_h_w():
    a = ids_assignment(torch.tensor([0, -1, 1, 2]))
    flags = [0, 0, 1, 0, 1, 1, 1, 0]  # chosen rows first: s = [1, 1, 0, 0]
    for unsafe in (torch.tensor(flags), torch.tensor(flags).bool(), torch.tensor(flags, dtype=torch.float64)):
        s = pair_signs(unsafe, a)
        assert s.dtype == torch.float32
        equal(s, torch.tensor([1, 1, 0, 0], dtype=torch.float32))  # flags, not categories, decide


def test_invalid_flags_give_nan_signs():
    a = ids_assignment(torch.tensor([0, 1, 2, 0, 1, -1]))
    chosen = [0, 2, 0, NAN, 1, 0.0]
    rejected = [1, 1, 0.5, 1, 0, -1.0]
    s = pair_signs(torch.tensor(chosen + rejected, dtype=torch.float64), a)
    # a valid pair; a flag of 2; 0.5; NaN; chosen unsafe over safe rejected (s = -1); -1
    equal(s, torch.tensor([1, NAN, NAN, NAN, NAN, NAN], dtype=torch.float32))


def test_pair_inputs_build_everything_once():
    unsafe = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    spec = LOSS_TYPE_TABLE["catdpo"]
    p = PairInputs.build(spec, IDS, MARGINS, 0.0, unsafe, num_categories=C, num_pairs=6, device=CPU)
    assert p.num_pairs == 6
    equal(p.assignment.rows, ROWS)
    equal(p.margin_table, [0.5, 1.0, 2.0, 0.0, NAN])
    equal(p.signs, torch.ones(6))
