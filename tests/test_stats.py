"""``CategoryStats`` and ``StatsAccumulator`` on tables written out by hand
(docs/design.md, "Statistics")."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import make_batch

import catdpo_kernels
from catdpo_kernels import STAT_COLUMNS, CategoryStats
from catdpo_kernels.stats import StatsAccumulator, all_reduce_sum

NAN = float("nan")
# C = 2: category 0 has 4 pairs, category 1 none, the no-category row 2.
#            count loss  unsafe_pref  margin_ok  reward_margin  reward_acc  reward_tie
TABLE = [
    [4.0, 2.0, 1.5, 3.0, 0.8, 2.0, 1.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [2.0, 1.0, 0.5, 1.0, -0.2, 2.0, 0.0],
]


def table(rows=TABLE, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def same(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    torch.testing.assert_close(actual.nan_to_num(0.0), expected.nan_to_num(0.0), rtol=1e-6, atol=1e-7)


def test_columns_by_name():
    assert STAT_COLUMNS == (
        "count",
        "loss_sum",
        "unsafe_pref_sum",
        "margin_ok",
        "reward_margin_sum",
        "reward_acc",
        "reward_tie",
    )
    s = CategoryStats(table())
    assert s.num_categories == 2
    for j, name in enumerate(STAT_COLUMNS):
        same(s.column(name), [row[j] for row in TABLE])
        assert torch.equal(getattr(s, name), s.column(name)), name
    same(s.count, [4, 0, 2])
    same(s.reward_margin_sum, [0.8, 0.0, -0.2])


def test_unsafe_count_and_rate_soft_and_hard():
    s = CategoryStats(table())
    same(s.unsafe_count("soft"), [1.5, 0.0, 0.5])  # Σ σ(−β·h)
    same(s.unsafe_count(), s.unsafe_count("soft"))
    # Σ 1[h < 0] + ½·Σ 1[h = 0]: of category 0's 4 pairs, 2 have h > 0, 1 ties and 1 has h < 0.
    same(s.unsafe_count("hard"), [1.5, 0.0, 0.0])
    same(s.unsafe_rate("soft"), [1.5 / 4, NAN, 0.5 / 2])  # an empty row has no rate
    same(s.unsafe_rate("hard"), [1.5 / 4, NAN, 0.0])
    with pytest.raises(ValueError, match="signal must be one of"):
        s.unsafe_rate("judge")


def test_mean_of_a_column():
    s = CategoryStats(table())
    same(s.mean("loss_sum"), [0.5, NAN, 0.5])
    same(s.mean("reward_margin_sum"), [0.2, NAN, -0.1])
    same(s.mean("count"), [1.0, NAN, 1.0])


def test_sum_of_several_tables():
    a, b = table(), table([[1, 1, 1, 1, 1, 1, 0], [2, 2, 2, 2, 2, 2, 0], [0, 0, 0, 0, 0, 0, 0]])
    total = CategoryStats.sum([a, CategoryStats(b), a])
    same(total.table, 2 * a + b)
    assert total.table.data_ptr() != a.data_ptr()
    same(a, table())  # the inputs are left alone
    with pytest.raises(ValueError, match="at least one"):
        CategoryStats.sum([])


def test_to_dict_names_the_rows():
    d = CategoryStats(table()).to_dict(["violence", "privacy"])
    assert list(d) == ["violence", "privacy", "no category"]
    assert list(d["violence"]) == [*STAT_COLUMNS, "unsafe_rate"]
    assert d["violence"]["count"] == 4.0 and d["violence"]["unsafe_rate"] == 1.5 / 4
    assert d["no category"]["loss_sum"] == 1.0 and d["no category"]["reward_margin_sum"] == pytest.approx(-0.2)
    assert math.isnan(d["privacy"]["unsafe_rate"])
    assert all(isinstance(v, float) for entry in d.values() for v in entry.values())
    assert CategoryStats(table()).to_dict(signal="hard")["category_0"]["unsafe_rate"] == 1.5 / 4
    assert list(CategoryStats(table()).to_dict()) == ["category_0", "category_1", "no category"]
    with pytest.raises(ValueError, match="C = 2 entries"):
        CategoryStats(table()).to_dict(["only one"])


def test_bad_tables_are_refused():
    with pytest.raises(TypeError, match="torch.Tensor"):
        CategoryStats(TABLE)
    with pytest.raises(ValueError, match="shape"):
        CategoryStats(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shape"):
        CategoryStats(torch.zeros(0, len(STAT_COLUMNS)))
    with pytest.raises(ValueError, match="shape"):
        CategoryStats(torch.zeros(len(STAT_COLUMNS)))
    with pytest.raises(TypeError, match="floating-point"):
        CategoryStats(torch.zeros(3, len(STAT_COLUMNS), dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        CategoryStats(torch.zeros(3, len(STAT_COLUMNS), dtype=torch.complex64))
    with pytest.raises(KeyError, match="unknown stats column 'accuracy'"):
        CategoryStats(table()).column("accuracy")


def test_wraps_a_detached_view_and_accepts_float64():
    t = table(dtype=torch.float64).requires_grad_()
    s = CategoryStats(t)
    assert not s.table.requires_grad and s.table.dtype == torch.float64
    again = CategoryStats(s)
    assert again.table.data_ptr() == t.data_ptr() and torch.equal(again.table, s.table)  # a view, not a copy
    assert "C=2" in repr(s) and "pairs=6" in repr(s)


def test_all_reduce_is_the_identity_without_distributed():
    t = table()
    reduced = CategoryStats(t).all_reduce()
    assert reduced.table.dtype == torch.float64  # summed in float64
    same(reduced.table, t.double())
    assert all_reduce_sum(t) is t


def test_accumulator_adds_and_hands_over_once():
    acc = StatsAccumulator()
    assert acc.take() is None
    a = table().requires_grad_()
    acc.add(a)
    acc.add(table())
    assert not acc.total.requires_grad
    total = acc.take()
    same(total, 2 * table())
    assert acc.take() is None and acc.total is None
    acc.add(table())
    same(acc.take(), table())
    same(a.detach(), table())  # the first table was copied, not summed into


def test_reads_the_table_of_a_real_loss():
    batch = make_batch(6, 3, 11, 3, seed=4)
    out = catdpo_kernels.loss(**batch, backend="torch")
    s = CategoryStats(out.category_stats)
    cats = batch["categories"]
    expected = [float((cats == c).sum()) for c in range(3)] + [float((cats == -1).sum())]
    same(s.count, expected)
    assert float(s.count.sum()) == 6
    active = s.count > 0
    rate = s.unsafe_rate()
    assert torch.isnan(rate[~active]).all() and ((rate[active] >= 0) & (rate[active] <= 1)).all()
    per_pair = catdpo_kernels.loss(**batch, backend="torch", reduction="none").loss
    torch.testing.assert_close(s.loss_sum.sum(), per_pair.sum().float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_a_policy_equal_to_its_reference_ties_every_pair_and_reads_one_half(backend):
    """At the first step the policy is the reference: h = 0 for every pair, no evidence either way,
    so both signals read ½ (the hard one counts a tie as half unsafe)."""
    if backend == "triton":
        pytest.importorskip("triton")
    batch = make_batch(4, 5, 13, 2, seed=9)
    batch["ref_logits"] = batch["policy_logits"].detach().clone()
    s = CategoryStats(catdpo_kernels.loss(**batch, backend=backend).category_stats)
    active = s.count > 0
    same(s.reward_tie, s.count)
    same(s.reward_acc, torch.zeros_like(s.count))
    same(s.unsafe_rate("hard")[active], torch.full_like(s.count[active], 0.5))
    same(s.unsafe_rate("soft")[active], torch.full_like(s.count[active], 0.5))
