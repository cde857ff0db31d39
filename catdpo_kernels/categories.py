"""Harm categories: the one place that decides what a ``categories`` argument means.

``CategoryAssignment.from_categories`` turns the user's ``categories`` into the
stats row(s) of every pair. The rule, written only here:

- ``(B,)`` ids: ``c ∈ [0, C)`` is row ``c``; ``-1`` (no category) is row ``C``;
  any other id is *invalid* (reachable only with ``check_inputs=False``) and
  maps to row ``C + 1``, which counts in no statistic and poisons the pair's
  loss with NaN;
- ``(B, C)`` bool multi-hot: a pair counts in every row it carries, and an
  all-false pair in row ``C``; its margin is the largest ``Δ_c`` over its rows;
- ``None``: every pair is in row ``C``.

Everything downstream only indexes: the margin gather (``margin_table``), the
stats table (``segment_ids``), the ``category_mean`` weights and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss_types import LossType

# The 19 harm categories of PKU-SafeRLHF, in the key order of its
# ``response_{0,1}_harm_category`` dicts. Checked against the published data:
# the PKU-SafeRLHF-QA card numbers the categories 0-18 in this order, and the
# ``harm_category`` dicts of its rows (the same per-response labels) list their
# keys in it.
PKU_SAFERLHF_CATEGORIES = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)


@dataclass(frozen=True)
class CategoryAssignment:
    """Which stats rows each of ``num_pairs`` pairs counts in, over ``C`` categories.

    Exactly one of ``rows`` (``(B,)`` int64 in ``[0, C + 1]``) and ``member``
    (``(B, C + 1)`` bool, column ``C`` set for pairs without a category) is set.
    """

    num_categories: int
    num_pairs: int
    rows: torch.Tensor | None = None
    member: torch.Tensor | None = None

    @classmethod
    def from_categories(
        cls, categories: torch.Tensor | None, num_categories: int, num_pairs: int, device: torch.device
    ) -> CategoryAssignment:
        c = num_categories
        if categories is None:
            return cls(c, num_pairs, rows=torch.full((num_pairs,), c, device=device, dtype=torch.int64))
        if categories.dim() == 2:
            member = torch.cat([categories, ~categories.any(-1, keepdim=True)], dim=1)
            return cls(c, num_pairs, member=member)
        ids = categories.long()
        rows = torch.where(ids == -1, c, ids)
        rows = torch.where((ids < -1) | (ids >= c), c + 1, rows)
        return cls(c, num_pairs, rows=rows)

    @property
    def none_row(self) -> int:
        return self.num_categories

    @property
    def multi_hot(self) -> bool:
        return self.member is not None

    def invalid(self) -> torch.Tensor | None:
        """``(B,)`` bool: pairs with an out-of-range id (``None`` when there can be none)."""
        return None if self.rows is None else self.rows > self.num_categories

    def has_category(self) -> torch.Tensor:
        """``(B,)`` bool: pairs with at least one real category (``s = 1`` when no flags are given)."""
        if self.member is not None:
            return ~self.member[:, self.num_categories]
        return self.rows < self.num_categories

    def membership(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``(B, C + 1)`` 0/1 matrix of the rows each pair counts in; invalid pairs count nowhere."""
        if self.member is not None:
            return self.member.to(dtype)
        target = torch.arange(self.num_categories + 1, device=self.rows.device)
        return (self.rows.unsqueeze(-1) == target).to(dtype)

    def segment_ids(self) -> tuple[torch.Tensor, int]:
        """``(segment_ids, num_segments)`` for ``torch.ops.catdpo.segment_reduce``.

        Every row, the no-category row included, is an ordinary segment here, so
        the op's own "none" row stays empty and its result is cut to ``C + 1`` rows.
        """
        return (self.member if self.member is not None else self.rows), self.num_categories + 1

    def gather(self, per_row: torch.Tensor) -> torch.Tensor:
        """Per-pair sum of ``per_row[r]`` over the rows the pair counts in; NaN for invalid pairs.

        ``per_row`` is ``(C + 1,)``; the adjoint of the segment sum.
        """
        if self.member is not None:
            return self.member.to(per_row.dtype) @ per_row
        return torch.cat([per_row, per_row.new_full((1,), float("nan"))])[self.rows]

    def margin_table(self, spec: LossType, margins: torch.Tensor | None, margin: float) -> torch.Tensor:
        """``Δ`` per stats row, ``(C + 2,)`` float64: ``[Δ_0 … Δ_{C−1}, Δ_none, NaN]``.

        A pair's margin is ``table[row]`` (multi-hot: the largest entry over its
        rows); the NaN slot is the invalid row. ``Δ_none`` is 0 except for the
        scalar SafeDPO margin, which applies to every pair.
        """
        c = self.num_categories
        device = margins.device if margins is not None else self._device()
        dtype = torch.float64  # exact for any margin dtype; the pair stage casts to its own
        if spec.margin == "per_category":
            table = torch.cat([margins.detach().to(dtype), torch.zeros(1, device=device, dtype=dtype)])
        elif spec.margin == "scalar":
            table = torch.full((c + 1,), float(margin), device=device, dtype=dtype)
        else:
            table = torch.zeros(c + 1, device=device, dtype=dtype)
        return torch.cat([table, torch.full((1,), float("nan"), device=device, dtype=dtype)])

    def pair_margins(self, table: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-pair ``Δ`` from ``margin_table``'s table."""
        if self.member is not None:
            per_row = table[: self.num_categories + 1].expand(self.num_pairs, -1)
            return torch.where(self.member, per_row, float("-inf")).amax(-1)
        return table[self.rows]

    def _device(self) -> torch.device:
        return (self.rows if self.rows is not None else self.member).device
