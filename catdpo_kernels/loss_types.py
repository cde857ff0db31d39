"""The loss types: which per-pair formula each one uses and which margin it reads.

Every loss type is one row of ``LOSS_TYPE_TABLE``. The formulas themselves live
once per backend, keyed by the *family*:

- ``sigmoid``: ``ℓ = softplus(−z)``, ``∂ℓ/∂h = −β·σ(−z)``;
- ``ipo``:     ``ℓ = (h − 1/(2β))²``, ``∂ℓ/∂h = 2·(h − 1/(2β))``;

with ``h = (π_w − ρ_w) − (π_l − ρ_l)`` and ``z = β·h − s·Δ``. The *margin kind*
says where ``Δ`` comes from:

- ``none``: ``Δ = 0``;
- ``scalar``: one global ``Δ`` (the ``margin=`` argument);
- ``per_category``: ``Δ_c`` gathered per pair from ``margins=`` (multi-hot: the largest).

A new loss type that reuses a family is one row here. A new family adds one
formula to ``reference.PAIR_FORMULAS``, ``ops/pair_terms_torch.py`` and the
Triton pair kernel (``kernels/pair_terms.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("sigmoid", "ipo")
MARGIN_KINDS = ("none", "scalar", "per_category")


@dataclass(frozen=True)
class LossType:
    name: str
    family: str
    margin: str

    @property
    def family_code(self) -> int:
        """The family as the integer the Triton pair kernel branches on."""
        return FAMILIES.index(self.family)


LOSS_TYPE_TABLE = {
    "dpo": LossType("dpo", family="sigmoid", margin="none"),
    "ipo": LossType("ipo", family="ipo", margin="none"),
    "safedpo": LossType("safedpo", family="sigmoid", margin="scalar"),
    "catdpo": LossType("catdpo", family="sigmoid", margin="per_category"),
}

for _spec in LOSS_TYPE_TABLE.values():
    assert _spec.family in FAMILIES and _spec.margin in MARGIN_KINDS, _spec


def loss_type(name: str) -> LossType:
    try:
        return LOSS_TYPE_TABLE[name]
    except KeyError:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPE_TABLE)}, got {name!r}") from None
