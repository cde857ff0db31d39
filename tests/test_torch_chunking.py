"""``backend="torch"`` internals: how the logits are cut into token blocks, and gradcheck.

The scenarios every backend shares are in ``test_correctness.py``.
"""

from __future__ import annotations

import pytest
import torch
from _utils import assert_backend_matches_reference, make_batch, run_loss

import catdpo_kernels
from catdpo_kernels.ops import sequence_logps_torch as slt


def test_token_blocks_cover_the_grid_exactly_once():
    for budget, rows, tokens, vocab in [(100, 3, 9, 37), (10, 2, 4, 37), (37 * 12, 8, 3, 37), (1 << 21, 5, 1, 1)]:
        seen = torch.zeros(rows, tokens, dtype=torch.int64)
        for rs, ts in slt.token_blocks(rows, tokens, vocab, budget):
            seen[rs, ts] += 1
            n = (rs.stop - rs.start) * (ts.stop - ts.start)
            assert n * vocab <= max(budget, vocab), (budget, rs, ts)
        assert torch.equal(seen, torch.ones_like(seen)), (budget, rows, tokens, vocab)


def test_token_blocks_read_the_module_budget_at_call_time(monkeypatch):
    assert len(list(slt.token_blocks(8, 3, 37))) == 1
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 37 * 7)
    assert len(list(slt.token_blocks(8, 3, 37))) == 4  # 2 rows of 3 tokens per block


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
    unchunked = [run_loss(batch, backend="torch", beta=0.1, **opts) for opts in variants]
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", chunk)
    assert len(list(slt.token_blocks(8, T, V))) > 1
    for opts, (out_default, grad_default) in zip(variants, unchunked):
        out, grad, _, _ = assert_backend_matches_reference(batch, backend="torch", beta=0.1, **opts)
        # Per token the math is the same in any blocking; only the order of the
        # fp32 sums over a split row may differ.
        torch.testing.assert_close(out.policy_logps, out_default.policy_logps, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad, grad_default, atol=1e-7, rtol=1e-5)


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
    opts = {"beta": 0.5, **opts}
    batch = make_batch(2, 3, 4, 3, torch.float64, seed=47, masked_frac=0.3, fully_masked_rows=(3,))
    x = batch.pop("policy_logits").clone().requires_grad_()
    if opts["loss_type"] != "catdpo":  # only catdpo reads per-category margins
        batch["margins"] = None
        opts["num_categories"] = 3

    def fn(logits):
        out = catdpo_kernels.loss(logits, **batch, backend="torch", **opts)
        return out.loss, out.policy_logps

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
