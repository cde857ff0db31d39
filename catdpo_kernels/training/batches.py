"""The data of a run: train and held-out splits, the deterministic step schedule, collation.

The schedule depends on the seed, the data size, the batch shape and the world
size only, so a resumed run skips exactly the steps its checkpoint trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as D
from ..validation import check_preference_batch
from .config import TrainConfig


@dataclass
class Split:
    """One split: its pairs, their tokenization, the transform report and (``--precompute-ref``)
    the ``(N, 2)`` reference log-probs (chosen, rejected)."""

    pairs: list
    tokenized: list
    report: D.TransformReport
    ref_logps: torch.Tensor | None = None


def load_splits(cfg: TrainConfig):
    """``((train_pairs, train_report), (held_pairs, held_report))`` after the SafeDPO transform."""
    kw = dict(config=cfg.data_config, on_error=cfg.on_bad_rows, preference_key=cfg.preference_key)
    src = Path(cfg.data) if cfg.data is not None else None
    if cfg.eval_data is not None:
        train = D.load_pairs(cfg.data, split=cfg.train_split, limit=cfg.max_train_pairs, **kw)
        held = D.load_pairs(cfg.eval_data, split=cfg.eval_split, limit=cfg.max_eval_pairs, **kw)
    elif src is not None and src.is_file():
        train, held = _carve_held_out(D.load_pairs(src, **kw), cfg)
    else:
        train = D.load_pairs(cfg.data, split=cfg.train_split, limit=cfg.max_train_pairs, **kw)
        held = D.load_pairs(cfg.data, split=cfg.eval_split, limit=cfg.max_eval_pairs, **kw)
    return train, held


def _carve_held_out(loaded, cfg: TrainConfig):
    """A single file: a seeded ``eval_fraction`` of its pairs is held out."""
    pairs, report = loaded
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, int(round(cfg.eval_fraction * len(pairs))))
    held_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    train = _sub_report([pairs[i] for i in train_idx][: cfg.max_train_pairs], report)
    held = _sub_report([pairs[i] for i in held_idx][: cfg.max_eval_pairs], report)
    return train, held


def _sub_report(pairs, full: D.TransformReport):
    """The report of a subset of a transformed file's pairs (drops and skips: the whole file's)."""
    rep = D.TransformReport(category_names=full.category_names, category_counts=[0] * len(full.category_names))
    for p in pairs:
        rep.add_pair(p)
    rep.rows = rep.kept
    rep.skipped_malformed = list(full.skipped_malformed)
    rep.dropped_both_unsafe = full.dropped_both_unsafe
    return pairs, rep


def steps_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    """Optimiser steps per epoch: each rank gets ``n // world`` pairs, in whole micro-batches and steps."""
    return (n // world // cfg.batch_size) // cfg.grad_accum


def step_schedule(n: int, cfg: TrainConfig, rank: int, world: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Endless deterministic schedule of optimiser steps: ``(epoch, grad_accum index lists)``."""
    per_rank = n // world
    micro_per_epoch = per_rank // cfg.batch_size
    per_epoch = steps_per_epoch(n, cfg, world)
    if per_epoch == 0:
        raise ValueError(
            f"{n} training pairs are too few for batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x "
            f"{world} rank(s); lower --batch-size or --grad-accum"
        )
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()[: per_rank * world]
        mine = perm[rank::world]
        micro = [mine[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(micro_per_epoch)]
        for s in range(per_epoch):
            yield epoch, micro[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]
        epoch += 1


def collate(split: Split, idx: list[int], pad_id: int, device: torch.device) -> dict:
    """The pairs ``idx`` of ``split`` as a padded batch on ``device`` (rows ``[0, B)`` chosen, ``[B, 2B)``
    rejected), with ``ref_logps`` ``(2B,)`` when the split has precomputed ones."""
    batch = D.collate_pairs([split.tokenized[i] for i in idx], pad_id)
    # Checked on the CPU, where it costs no device sync; a bad pair is named by its index in the split.
    check_preference_batch(
        unsafe=batch["unsafe"],
        categories=batch["categories"],
        num_categories=len(split.report.category_names),
        indices=idx,
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    if split.ref_logps is not None:
        ref = split.ref_logps[idx]  # (B, 2): chosen, rejected
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]]).to(device)
    return batch
