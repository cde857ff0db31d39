"""Names shared by every backend: loss types, reductions, backends, stats columns."""

from .loss_types import LOSS_TYPE_TABLE

LOSS_TYPES = tuple(LOSS_TYPE_TABLE)
REDUCTIONS = ("mean", "sum", "none", "category_mean")
BACKENDS = ("auto", "triton", "torch", "reference")

# Columns of the (C+1, K) per-category statistics table; catdpo_kernels.stats reads them by name.
STAT_COLUMNS = (
    "count",
    "loss_sum",
    "unsafe_pref_sum",
    "margin_ok",
    "reward_margin_sum",
    "reward_acc",
    "reward_tie",
)
NUM_STATS = len(STAT_COLUMNS)
STAT_INDEX = {name: i for i, name in enumerate(STAT_COLUMNS)}
