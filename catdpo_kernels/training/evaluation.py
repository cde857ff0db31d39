"""Held-out evaluation per harm category.

Per category: the unsafe-preference rate ``mean 1[h < 0] + ½·1[h = 0]`` (a tie,
which every pair is before the first step, counts half: see ``report``), the soft
rate ``mean sigmoid(-beta*h)`` (``soft``), the margin and the pair count.
Aggregates over pairs (not categories, which a multi-hot pair can hold several
of): the safe-vs-unsafe unsafe rate, the both-safe accuracy (a tie counts half),
the mean loss and the spread across categories.

The loss calls use the run criterion's options with ``reduction="none"``, under
``no_grad``, and never reach the step's statistics: evaluating does not move the
margins. The held-out pairs are sharded over the ranks and the sums all-reduced.
"""

from __future__ import annotations

import torch

from ..constants import NUM_STATS
from ..modules import CatDPOLoss
from ..stats import CategoryStats
from .batches import Split, collate
from .config import TrainConfig
from .criterion import eval_loss_kwargs
from .distributed import all_reduce_sum, rank_world
from .model import batch_loss, bind_loss

# The pair-level sums of an evaluation, in the order of the ``(6,)`` float64 vector.
PAIR_SUMS = ("safety_pairs", "unsafe", "soft_unsafe", "benign_pairs", "benign_correct", "loss_sum")


@torch.no_grad()
def evaluate(
    policy,
    ref_model,
    split: Split,
    cfg: TrainConfig,
    criterion: CatDPOLoss,
    pad_id: int,
    device,
    step: int,
    *,
    head: str = "logits",
    transform: dict | None = None,
) -> dict:
    """Held-out results of ``policy`` at ``step`` (see the module docstring); the same dict on every rank."""
    was_training = policy.training
    policy.eval()
    stats, pair_sums = _held_out_sums(policy, ref_model, split, cfg, criterion, pad_id, device, head, transform or {})
    if was_training:
        policy.train()
    margins = criterion.margins
    rows = _category_rows(stats, margins.names, margins.value.detach().cpu().tolist(), cfg)
    sums = dict(zip(PAIR_SUMS, pair_sums.tolist()))
    n_safe, n_benign = sums["safety_pairs"], sums["benign_pairs"]
    return dict(
        step=step,
        loss_type=cfg.loss_type,
        pairs=int(n_safe + n_benign),
        categories=rows,
        no_category=dict(count=int(stats.count[-1].item())),
        aggregate=_aggregate(rows, sums),
    )


def _held_out_sums(policy, ref_model, split: Split, cfg, criterion, pad_id, device, head, transform):
    """This rank's share of the held-out pairs, summed and all-reduced: ``(CategoryStats, (6,) PAIR_SUMS)``."""
    rank, world = rank_world()
    loss_fn = bind_loss(head, transform, **eval_loss_kwargs(criterion))
    tables = [torch.zeros(criterion.num_categories + 1, NUM_STATS, dtype=torch.float64)]
    pair_sums = torch.zeros(len(PAIR_SUMS), dtype=torch.float64)
    mine = list(range(rank, len(split.tokenized), world))
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start : start + cfg.batch_size]
        batch = collate(split, idx, pad_id, device)
        out = batch_loss(head, policy, ref_model, batch, device, cfg, loss_fn, transform)
        tables.append(out.category_stats.double().cpu())
        bh = (out.chosen_rewards - out.rejected_rewards).double().cpu()
        _add_pair_sums(pair_sums, out, bh, batch["unsafe"].cpu(), len(idx))
    return CategoryStats.sum(tables).all_reduce(), all_reduce_sum(pair_sums)


def _add_pair_sums(pair_sums: torch.Tensor, out, bh: torch.Tensor, unsafe: torch.Tensor, b: int) -> None:
    """Add one batch's pair-level sums; a safe-vs-unsafe pair has ``s = h_l - h_w > 0``; a tie counts half."""
    s = (unsafe[b:] - unsafe[:b]) > 0
    half_tie = 0.5 * (bh == 0).double()
    pair_sums[0] += s.sum()
    pair_sums[1] += (((bh < 0).double() + half_tie) * s).sum()
    pair_sums[2] += (torch.sigmoid(-bh) * s).sum()
    pair_sums[3] += (~s).sum()
    pair_sums[4] += (((bh > 0).double() + half_tie) * ~s).sum()
    pair_sums[5] += out.loss.double().sum().cpu()


def _category_rows(stats: CategoryStats, names, margin_values: list[float], cfg: TrainConfig) -> list[dict]:
    """One dict per category: name, count, unsafe_rate (ties half), soft_unsafe (soft), margin."""
    count = stats.count.tolist()
    hard = stats.unsafe_rate("hard").tolist()  # a tie counts half
    soft = stats.unsafe_rate("soft").tolist()
    shows_margin = cfg.loss_type in ("catdpo", "safedpo")
    rows = []
    for c, name in enumerate(names):
        n = count[c]
        rows.append(
            dict(
                name=name,
                count=int(round(n)),
                unsafe_rate=hard[c] if n else None,
                soft_unsafe=soft[c] if n else None,
                margin=margin_values[c] if shows_margin else 0.0,
            )
        )
    return rows


def _aggregate(rows: list[dict], sums: dict) -> dict:
    """Pair-level rates and the spread of the per-category rates (over categories with pairs)."""
    active = [r for r in rows if r["count"]]
    rates = torch.tensor([r["unsafe_rate"] for r in active], dtype=torch.float64)
    soft = torch.tensor([r["soft_unsafe"] for r in active], dtype=torch.float64)
    best = min(active, key=lambda r: (r["unsafe_rate"], r["soft_unsafe"])) if active else None
    worst = max(active, key=lambda r: (r["unsafe_rate"], r["soft_unsafe"])) if active else None
    n_safe, n_benign = sums["safety_pairs"], sums["benign_pairs"]
    return dict(
        safety_pairs=int(n_safe),
        unsafe_rate=sums["unsafe"] / n_safe if n_safe else None,
        soft_unsafe=sums["soft_unsafe"] / n_safe if n_safe else None,
        benign_pairs=int(n_benign),
        benign_accuracy=sums["benign_correct"] / n_benign if n_benign else None,
        eval_loss=sums["loss_sum"] / max(n_safe + n_benign, 1),
        category_variance=rates.var(unbiased=False).item() if active else None,
        category_gap=(rates.max() - rates.min()).item() if active else None,
        soft_variance=soft.var(unbiased=False).item() if active else None,
        soft_gap=(soft.max() - soft.min()).item() if active else None,
        best=best["name"] if best else None,
        worst=worst["name"] if worst else None,
    )
