"""Names shared by every backend: loss types, reductions, backends, stats columns."""

LOSS_TYPES = ("dpo", "ipo", "safedpo", "catdpo")
REDUCTIONS = ("mean", "sum", "none", "category_mean")
BACKENDS = ("auto", "triton", "torch", "reference")

# Columns of the (C+1, K) per-category statistics table (DESIGN.md §1.3).
STAT_COLUMNS = (
    "count",
    "loss_sum",
    "unsafe_pref_sum",
    "margin_ok",
    "reward_margin_sum",
    "reward_acc",
)
NUM_STATS = len(STAT_COLUMNS)
STAT_INDEX = {name: i for i, name in enumerate(STAT_COLUMNS)}
