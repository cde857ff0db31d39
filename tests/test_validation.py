"""``check_preference_batch``: per-batch CPU checks that name the bad row by its data set index."""

import pytest
import torch

from catdpo_kernels.validation import check_preference_batch


def check(**kw):
    base = dict(unsafe=torch.tensor([0, 0, 1, 0]), categories=torch.tensor([2, -1]), num_categories=3)
    check_preference_batch(**{**base, **kw})


def test_a_valid_batch_passes():
    check()
    check(unsafe=None, categories=None)
    check(categories=torch.tensor([[True, False, False], [False, False, False]]))
    check(input_ids=torch.tensor([[0, 4], [1, 2], [3, 3], [4, 0]]), vocab=5)


@pytest.mark.parametrize("flags", [[2, 0, 1, 0], [0, 0, 1, -1], [0, 0.5, 1, 0], [0, float("nan"), 1, 0]])
def test_flags_that_are_not_0_1_are_named_by_index(flags):
    with pytest.raises(ValueError, match="data set row 1[01]: unsafe flags"):
        check(unsafe=torch.tensor(flags), indices=[10, 11])


def test_a_chosen_unsafe_rejected_safe_pair_is_refused():
    with pytest.raises(ValueError, match="data set row 7: unsafe flags .*\\(1, 0\\).*no less safe"):
        check(unsafe=torch.tensor([0, 1, 1, 0]), indices=[6, 7])
    with pytest.raises(ValueError, match="batch pair 1"):
        check(unsafe=torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("bad", [3, -2, 17])
def test_out_of_range_category_ids_are_named(bad):
    with pytest.raises(ValueError, match=f"data set row 4: category {bad} is outside \\[-1, C=3\\)"):
        check(categories=torch.tensor([0, bad]), indices=[3, 4])


def test_multi_hot_width_must_match_the_margins():
    with pytest.raises(ValueError, match="4 columns, the margins 3"):
        check(categories=torch.zeros(2, 4, dtype=torch.bool))


def test_token_ids_outside_the_vocabulary_name_the_pair_and_side():
    ids = torch.tensor([[0, 1], [1, 2], [3, 9], [4, 0]])
    with pytest.raises(ValueError, match="data set row 20: a token id outside .*\\[0, 5\\) in its rejected sequence"):
        check(input_ids=ids, vocab=5, indices=[20, 21])
