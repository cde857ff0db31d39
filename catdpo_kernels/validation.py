"""Per-batch checks of preference rows on the CPU, before anything reaches the device.

Training loops call ``check_preference_batch`` on every collated batch: the
flags and ids are still CPU tensors there, so checking costs no device sync,
and a bad row is reported by its index in the data set. (``loss()``'s own
``check_inputs`` then stays off: with it off a bad value gives NaN, never a
plausible number, but it is better not to train on one at all.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _where(indices: Sequence[int] | None, i: int) -> str:
    return f"data set row {indices[i]}" if indices is not None else f"batch pair {i}"


def check_preference_batch(
    *,
    unsafe: torch.Tensor | None,
    categories: torch.Tensor | None,
    num_categories: int,
    indices: Sequence[int] | None = None,
    input_ids: torch.Tensor | None = None,
    vocab: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the first bad pair (by data set index when ``indices`` are given).

    ``unsafe``: ``(2B,)`` 0/1 flags, chosen rows first; ``s = h_l − h_w`` must be 0 or 1.
    ``categories``: ``(B,)`` ids in ``[-1, C)`` or a ``(B, C)`` bool multi-hot matrix.
    ``input_ids``: ``(2B, T)`` token ids, which must be in ``[0, vocab)``.
    """
    if unsafe is not None:
        u = unsafe.detach().to("cpu", torch.float64)
        b = u.shape[0] // 2
        bad = ((u != 0) & (u != 1)).view(2, b).any(0) | (u[:b] > u[b:])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{_where(indices, i)}: unsafe flags (chosen, rejected) = ({u[i].item():g}, {u[b + i].item():g}); "
                "they must be 0/1 with the chosen response no less safe than the rejected one "
                "(apply SafeDPO's swap: catdpo_kernels.data does)"
            )
    if categories is not None:
        c = categories.detach().cpu()
        if c.dim() == 2:
            if c.shape[1] != num_categories:
                raise ValueError(f"multi-hot categories have {c.shape[1]} columns, the margins {num_categories}")
        else:
            bad = (c < -1) | (c >= num_categories)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{_where(indices, i)}: category {int(c[i])} is outside [-1, C={num_categories}) (-1 = none)"
                )
    if input_ids is not None and vocab is not None:
        ids = input_ids.detach().cpu()
        bad_rows = ((ids < 0) | (ids >= vocab)).any(-1)
        if bool(bad_rows.any()):
            r = int(bad_rows.nonzero()[0, 0])
            b = ids.shape[0] // 2
            raise ValueError(
                f"{_where(indices, r % b)}: a token id outside the model's vocabulary [0, {vocab}) "
                f"in its {'rejected' if r >= b else 'chosen'} sequence (a tokenizer/model mismatch?)"
            )
