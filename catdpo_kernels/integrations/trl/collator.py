"""``CatDPOCollator``: TRL's preference collator plus the Cat-DPO columns, checked on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...validation import check_preference_batch

INDEX_COLUMN = "catdpo_index"


class CatDPOCollator:
    """Wraps TRL's preference collator and adds, when the examples carry them:

    * ``category``: ``(B,)`` int64 ids or a ``(B, C)`` bool multi-hot matrix;
    * ``unsafe``: ``(2B,)`` int64 flags, chosen rows first.

    Every batch is checked here, on the CPU, where it costs no device sync: a bad
    flag, category or token id raises ``ValueError`` naming its data set row
    (the trainer adds a ``catdpo_index`` column for that).
    """

    def __init__(self, base: Callable[[list[dict]], dict], num_categories: int, vocab: int | None = None):
        self.base = base
        self.num_categories = num_categories
        self.vocab = vocab

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base(examples)
        first = examples[0]
        if "category" in first:
            cats = [ex["category"] for ex in examples]
            if isinstance(cats[0], (list, tuple)):
                out["category"] = torch.tensor([[bool(v) for v in c] for c in cats], dtype=torch.bool)
            else:
                out["category"] = torch.tensor([int(c) for c in cats], dtype=torch.long)
        if "unsafe" in first:
            pairs = torch.tensor([[int(v) for v in ex["unsafe"]] for ex in examples], dtype=torch.long)
            out["unsafe"] = torch.cat([pairs[:, 0], pairs[:, 1]])
        indices = [int(ex[INDEX_COLUMN]) for ex in examples] if INDEX_COLUMN in first else None
        check_preference_batch(
            unsafe=out.get("unsafe"),
            categories=out.get("category"),
            num_categories=self.num_categories,
            indices=indices,
            input_ids=out.get("input_ids"),
            vocab=self.vocab,
        )
        return out
