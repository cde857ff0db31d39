"""Typed access to the ``(C+1, K)`` per-category statistics table.

``LossOutput.category_stats`` stays a plain fp32 tensor, so that it can be
summed, all-reduced and passed through ``torch.compile`` like any other.
``CategoryStats`` wraps one for reading: named columns, the unsafe rate, a sum
over micro-batches, the all-reduce across ranks and a per-category dict.

Columns (``STAT_COLUMNS``), summed over the pairs of each row:

========================  =====================================================
``count``                 number of pairs
``loss_sum``              Σ ℓ
``unsafe_pref_sum``       Σ σ(−β·h): soft probability of preferring the unsafe response
``margin_ok``             Σ 1[z > 0]
``reward_margin_sum``     Σ β·h
``reward_acc``            Σ 1[h > 0]
``reward_tie``            Σ 1[h = 0]: ties, e.g. every pair while the policy still equals the reference
========================  =====================================================

Row ``c < C`` holds the pairs of category ``c``; row ``C`` the pairs without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .constants import NUM_STATS, STAT_COLUMNS, STAT_INDEX

SIGNALS = ("soft", "hard")


class CategoryStats:
    """A read-only view of a ``(C+1, K)`` statistics table.

    >>> stats = CategoryStats(out.category_stats)
    >>> stats.count, stats.unsafe_rate("soft")   # (C+1,) tensors
    """

    __slots__ = ("table",)

    def __init__(self, table: torch.Tensor):
        if isinstance(table, CategoryStats):
            table = table.table
        if not isinstance(table, torch.Tensor):
            raise TypeError(
                f"stats must be a torch.Tensor (the (C+1, K) category_stats table), got {type(table).__name__}"
            )
        if table.dim() != 2 or table.shape[1] != NUM_STATS or table.shape[0] < 1:
            raise ValueError(f"stats must have shape (C+1, K={NUM_STATS}), got {tuple(table.shape)}")
        if table.dtype.is_complex or not table.dtype.is_floating_point:
            raise TypeError(f"stats must be a real floating-point table, got {table.dtype}")
        self.table = table.detach()

    # ------------------------------------------------------------- columns
    def column(self, name: str) -> torch.Tensor:
        try:
            return self.table[:, STAT_INDEX[name]]
        except KeyError:
            raise KeyError(f"unknown stats column {name!r}; the columns are {STAT_COLUMNS}") from None

    count = property(lambda self: self.column("count"))
    loss_sum = property(lambda self: self.column("loss_sum"))
    unsafe_pref_sum = property(lambda self: self.column("unsafe_pref_sum"))
    margin_ok = property(lambda self: self.column("margin_ok"))
    reward_margin_sum = property(lambda self: self.column("reward_margin_sum"))
    reward_acc = property(lambda self: self.column("reward_acc"))
    reward_tie = property(lambda self: self.column("reward_tie"))

    @property
    def num_categories(self) -> int:
        return self.table.shape[0] - 1

    # ------------------------------------------------------------- derived
    def unsafe_count(self, signal: str = "soft") -> torch.Tensor:
        """Per row: ``Σ σ(−β·h)`` (``soft``), or ``Σ 1[h < 0] + ½·1[h = 0]`` (``hard``).

        A tie (``h = 0``) is no evidence either way, so the hard count takes it as half unsafe:
        the value ``σ(−β·0) = ½`` the soft signal gives it, and the usual convention for ties in
        a pairwise accuracy. At the first step, where the policy is the reference, every pair is
        a tie and both signals read ½.
        """
        if signal == "soft":
            return self.unsafe_pref_sum
        if signal == "hard":
            return self.count - self.reward_acc - 0.5 * self.reward_tie
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")

    def unsafe_rate(self, signal: str = "soft") -> torch.Tensor:
        """``unsafe_count / count`` per row; NaN for rows without pairs."""
        count = self.count
        rate = self.unsafe_count(signal) / count.clamp(min=1)
        return torch.where(count > 0, rate, float("nan"))

    def mean(self, name: str) -> torch.Tensor:
        """Per-row mean of a column (``loss_sum`` → mean loss); NaN for rows without pairs."""
        count = self.count
        return torch.where(count > 0, self.column(name) / count.clamp(min=1), float("nan"))

    # ------------------------------------------------------------- combine
    @staticmethod
    def sum(tables: Iterable[torch.Tensor | CategoryStats]) -> CategoryStats:
        """The sum of several tables (micro-batches of one step)."""
        total = None
        for t in tables:
            t = CategoryStats(t).table
            total = t.clone() if total is None else total + t
        if total is None:
            raise ValueError("CategoryStats.sum needs at least one table")
        return CategoryStats(total)

    def all_reduce(self) -> CategoryStats:
        """SUM over the ranks of ``torch.distributed`` (when initialised), in float64."""
        return CategoryStats(all_reduce_sum(self.table.to(torch.float64)))

    def to_dict(self, names: Sequence[str] | None = None, signal: str = "soft") -> dict[str, dict[str, float]]:
        """``{name: {column: value, ..., "unsafe_rate": r}}``; the last row is named ``"no category"``."""
        c = self.num_categories
        names = list(names) if names is not None else [f"category_{i}" for i in range(c)]
        if len(names) != c:
            raise ValueError(f"names must have C = {c} entries, got {len(names)}")
        rows = self.table.double().cpu()
        rate = self.unsafe_rate(signal).double().cpu()
        out = {}
        for i, name in enumerate([*names, "no category"]):
            entry = {col: float(rows[i, j]) for j, col in enumerate(STAT_COLUMNS)}
            entry["unsafe_rate"] = float(rate[i])
            out[name] = entry
        return out

    def __repr__(self) -> str:
        return f"CategoryStats(C={self.num_categories}, pairs={float(self.count.sum()):g})"


class StatsAccumulator:
    """Sums tables as they come and hands the total over once (``take``)."""

    def __init__(self):
        self.total: torch.Tensor | None = None

    def add(self, table: torch.Tensor) -> None:
        table = table.detach()
        self.total = table.clone() if self.total is None else self.total + table

    def take(self) -> torch.Tensor | None:
        total, self.total = self.total, None
        return total


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """SUM over ranks, on a device the process group's backend can use; a no-op when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    comm_device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    )
    buf = t.to(comm_device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)
