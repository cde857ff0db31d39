"""Argument checks for ``loss()``: every bad input becomes a ValueError/TypeError
that names the argument and says what was expected.

Shape, dtype and device checks are free. Value checks (label and category
ranges, 0/1 flags, finite margins) read tensor contents, which on CUDA is a
host sync; they run only with ``check_inputs=True``.
"""

from __future__ import annotations

import numbers

import torch

from .categories import CategoryAssignment
from .loss_types import LossType

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _require_int(name: str, t: torch.Tensor) -> None:
    # int16/uint8 ids would pass a looser check and then fail inside gather/index kernels.
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {t.dtype}")


def _require_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but policy_logits is on {device}; put both on one device")


def _require_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def check_logits(
    policy_logits, labels, ref_logits, ref_logps, *, shift_labels: bool, fused: bool
) -> tuple[int, int, int]:
    """Returns ``(2B, T, V)``."""
    _require_tensor("policy_logits", policy_logits)
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits must be 3-D (2B, T, V), got shape {tuple(policy_logits.shape)}")
    _require_float("policy_logits", policy_logits)
    rows, tokens, vocab = policy_logits.shape
    if rows == 0 or rows % 2:
        raise ValueError(
            f"policy_logits must have an even, non-zero first dim 2B (chosen rows then rejected rows), got {rows}"
        )
    if tokens == 0 or vocab == 0:
        raise ValueError(f"policy_logits must have T >= 1 and V >= 1, got shape {tuple(policy_logits.shape)}")
    if shift_labels and tokens < 2:
        raise ValueError(
            f"shift_labels=True needs T >= 2 (it reads logits[:, :-1] against labels[:, 1:]), got T={tokens}"
        )
    if fused and policy_logits.stride(-1) != 1:
        raise ValueError(
            f"policy_logits must have a contiguous vocab dim (stride(-1) == 1), got strides {policy_logits.stride()}; "
            "call .contiguous() first"
        )
    device = policy_logits.device
    _require_tensor("labels", labels)
    _require_int("labels", labels)
    _require_shape("labels", labels, (rows, tokens), "(2B, T)")
    _require_device("labels", labels, device)
    if (ref_logits is None) == (ref_logps is None):
        raise ValueError("pass exactly one of ref_logits (2B, T, V) or ref_logps (2B,)")
    if ref_logits is not None:
        _require_tensor("ref_logits", ref_logits)
        _require_float("ref_logits", ref_logits)
        _require_shape("ref_logits", ref_logits, policy_logits.shape, "(2B, T, V)")
        _require_device("ref_logits", ref_logits, device)
        if fused and ref_logits.stride(-1) != 1:
            raise ValueError(
                f"ref_logits must have a contiguous vocab dim (stride(-1) == 1), got strides {ref_logits.stride()}"
            )
    else:
        _require_tensor("ref_logps", ref_logps)
        _require_float("ref_logps", ref_logps)
        _require_shape("ref_logps", ref_logps, (rows,), "(2B,)")
        _require_device("ref_logps", ref_logps, device)
    return rows, tokens, vocab


def check_categories(categories, margins, num_categories, *, num_pairs: int, spec: LossType, device) -> int:
    """Validates shapes and the margin rule; returns ``C``, the number of categories."""
    if margins is not None:
        if spec.margin != "per_category":
            hint = "pass the scalar margin= instead" if spec.margin == "scalar" else "it takes no margin"
            raise ValueError(
                f"margins (per-category Δ_c) is read only by loss_type='catdpo'; loss_type={spec.name!r} would "
                f"ignore it ({hint}). To size the stats table without margins, pass num_categories=C"
            )
        _require_tensor("margins", margins)
        _require_float("margins", margins)
        if margins.dim() != 1:
            raise ValueError(f"margins must be 1-D (C,), got shape {tuple(margins.shape)}")
        _require_device("margins", margins, device)
    if spec.margin == "per_category" and margins is None:
        raise ValueError(f"loss_type={spec.name!r} needs margins: a (C,) tensor or a CategoryMargins")
    if num_categories is not None:
        if isinstance(num_categories, bool) or not isinstance(num_categories, numbers.Integral) or num_categories < 0:
            raise ValueError(f"num_categories must be an int >= 0, got {num_categories!r}")
    candidates = {}
    if margins is not None:
        candidates["margins"] = margins.shape[0]
    if num_categories is not None:
        candidates["num_categories"] = int(num_categories)
    if categories is not None:
        _require_tensor("categories", categories)
        _require_device("categories", categories, device)
        if categories.dim() == 1:
            _require_int("categories", categories)
            _require_shape("categories", categories, (num_pairs,), "(B,)")
        elif categories.dim() == 2:
            if categories.dtype != torch.bool:
                raise TypeError(
                    f"categories as a (B, C) multi-hot matrix must be bool, got {categories.dtype}; use .bool()"
                )
            if categories.shape[0] != num_pairs:
                raise ValueError(
                    f"categories must have shape (B, C) with B = {num_pairs}, got {tuple(categories.shape)}"
                )
            if categories.shape[1] == 0:
                raise ValueError(
                    "categories as a (B, C) multi-hot matrix needs C >= 1 columns; pass None for no categories"
                )
            candidates["categories"] = categories.shape[1]
        else:
            raise ValueError(
                f"categories must be (B,) int64 ids or (B, C) bool multi-hot, got shape {tuple(categories.shape)}"
            )
    sizes = set(candidates.values())
    if categories is not None and sizes == {0}:
        raise ValueError("categories need C >= 1 categories (margins / num_categories give C = 0)")
    if len(sizes) > 1:
        detail = ", ".join(f"{k} gives C={v}" for k, v in candidates.items())
        raise ValueError(f"the number of categories C disagrees: {detail}")
    if sizes:
        return sizes.pop()
    if categories is not None:
        raise ValueError(
            "categories given as (B,) ids need margins= or num_categories= to fix C, "
            "the size of the (C+1, K) stats table"
        )
    return 0


def check_inplace_target(policy_logits: torch.Tensor) -> None:
    """``inplace_backward`` overwrites the logits with their gradient: refuse buffers
    where that would corrupt a parameter or race with itself."""
    base = policy_logits if policy_logits._base is None else policy_logits._base
    if base.is_leaf and base.requires_grad:
        raise ValueError(
            "inplace_backward=True overwrites policy_logits with its gradient; it needs logits that are an "
            "intermediate result (e.g. the lm_head output), not a leaf tensor that requires grad or a view of one"
        )
    if torch._debug_has_internal_overlap(policy_logits) != 0:
        raise ValueError(
            "inplace_backward=True needs policy_logits without overlapping memory (e.g. not an expand()ed tensor)"
        )


def check_unsafe(unsafe, *, rows: int, device) -> None:
    if unsafe is None:
        return
    _require_tensor("unsafe", unsafe)
    if unsafe.dtype.is_complex:
        raise TypeError(f"unsafe must be bool, integer or float 0/1 flags, got {unsafe.dtype}")
    _require_shape("unsafe", unsafe, (rows,), "(2B,)")
    _require_device("unsafe", unsafe, device)


def check_values(
    *,
    labels,
    ignore_index,
    vocab,
    assignment: CategoryAssignment,
    categories,
    unsafe,
    margins,
    shift_labels=False,
    unread=None,
) -> None:
    """The content checks: ranges, flags, finiteness.

    All of them are reduced to one flag first, so a valid batch costs a single host
    sync on CUDA (and a single graph break under ``torch.compile``); the detailed
    message is only worked out on the failure path.
    """
    bad_labels = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if unread is not None:
        bad_labels &= ~unread  # positions no token is scored against
    elif shift_labels:
        bad_labels[:, 0] = False  # never read: logits[:, :-1] are scored against labels[:, 1:]
    flags = [bad_labels.any()]
    bad_cats = assignment.invalid()
    if bad_cats is not None:
        flags.append(bad_cats.any())
    bad_unsafe = swapped = None
    if unsafe is not None:
        u = unsafe.to(torch.float64)
        bad_unsafe = (u != 0) & (u != 1)  # NaN counts as bad too
        flags.append(bad_unsafe.any())
        # s = h_l - h_w = -1: an unsafe chosen over a safe rejected response, which
        # SafeDPO's transform swaps in the data layer; the loss would reward it.
        half = u.shape[0] // 2
        swapped = u[:half] > u[half:]
        flags.append(swapped.any())
    if margins is not None:
        flags.append(~torch.isfinite(margins).all())
    if not bool(torch.stack(flags).any()):
        return
    if bool(bad_labels.any()):
        first = bad_labels.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"labels{tuple(first)} = {int(labels[tuple(first)])}"
        )
    if bad_cats is not None and bool(bad_cats.any()):
        i = int(bad_cats.nonzero()[0, 0])
        raise ValueError(
            f"categories must be in [-1, C={assignment.num_categories}) (-1 = no category); "
            f"categories[{i}] = {int(categories[i])}"
        )
    if bad_unsafe is not None and bool(bad_unsafe.any()):
        i = int(bad_unsafe.nonzero()[0, 0])
        raise ValueError(
            f"unsafe must hold 0/1 flags per response row (chosen rows first); unsafe[{i}] = {unsafe[i].item()}"
        )
    if swapped is not None and bool(swapped.any()):
        i = int(swapped.nonzero()[0, 0])
        raise ValueError(
            f"unsafe marks chosen row {i} unsafe and its rejected row {i + half} safe (s = h_l - h_w = -1); "
            "apply SafeDPO's swap first (catdpo_kernels.data does) so that s is 0 or 1"
        )
    raise ValueError("margins must be finite")


def check_backend_dtypes(backend, **tensors) -> None:
    """Backends without float64 kernels refuse float64 inputs by name."""
    if backend.float64_ok:
        return
    for name, t in tensors.items():
        if t is not None and t.dtype == torch.float64:
            raise TypeError(
                f"backend={backend.name!r} takes float16, bfloat16 or float32 {name}, got float64; use backend='torch'"
            )


def check_head(hidden, weight, bias, labels, cu_seqlens, *, shift_labels: bool, fused: bool) -> tuple[int, int]:
    """The fused head's policy inputs; returns ``(2B, V)``.

    Padded: ``hidden (2B, T, H)``, ``labels (2B, T)``. Packed: ``hidden (N, H)``,
    ``labels (N,)``, ``cu_seqlens (2B + 1,)`` from 0 to N, non-decreasing.
    """
    _require_tensor("hidden", hidden)
    _require_float("hidden", hidden)
    _require_tensor("weight", weight)
    _require_float("weight", weight)
    device = hidden.device
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (V, H) like an nn.Linear/embedding weight, got shape {tuple(weight.shape)}"
        )
    vocab, width = weight.shape
    if vocab == 0:
        raise ValueError("weight must have V >= 1 rows")
    if hidden.shape[-1] != width:
        raise ValueError(
            f"hidden has H={hidden.shape[-1]} features but weight is (V, H) = {tuple(weight.shape)}; "
            "pass the output embedding weight (model.get_output_embeddings().weight)"
        )
    _require_device("weight", weight, device)
    if bias is not None:
        _require_tensor("bias", bias)
        _require_float("bias", bias)
        _require_shape("bias", bias, (vocab,), "(V,)")
        _require_device("bias", bias, device)
    _require_tensor("labels", labels)
    _require_int("labels", labels)
    _require_device("labels", labels, device)
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                "hidden must be (2B, T, H) (padded), or (N, H) with cu_seqlens= (packed); "
                f"got shape {tuple(hidden.shape)}"
            )
        rows, tokens, _ = hidden.shape
        if rows == 0 or rows % 2:
            raise ValueError(
                f"hidden must have an even, non-zero first dim 2B (chosen rows, then rejected), got {rows}"
            )
        if tokens == 0:
            raise ValueError("hidden must have T >= 1")
        if shift_labels and tokens < 2:
            raise ValueError(f"shift_labels=True needs T >= 2, got T={tokens}")
        _require_shape("labels", labels, (rows, tokens), "(2B, T)")
        return rows, vocab
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens (packed input) hidden must be (N, H), got shape {tuple(hidden.shape)}")
    n = hidden.shape[0]
    _require_shape("labels", labels, (n,), "(N,)")
    _require_tensor("cu_seqlens", cu_seqlens)
    _require_int("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 3 or (cu_seqlens.shape[0] - 1) % 2:
        raise ValueError(
            f"cu_seqlens must be (2B + 1,) for 2B sequences (chosen then rejected, 2B even and >= 2), "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    # Reading a few ints is a host sync; the layout needs these boundaries on the host anyway.
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at N = {n} (hidden rows), got {bounds[0]} ... {bounds[-1]}"
        )
    steps = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(s < 0 for s in steps):
        i = next(i for i, s in enumerate(steps) if s < 0)
        raise ValueError(
            f"cu_seqlens must be non-decreasing; cu_seqlens[{i}] = {bounds[i]} > cu_seqlens[{i + 1}] = {bounds[i + 1]}"
        )
    return len(bounds) - 1, vocab


def check_ref_head(ref_hidden, ref_weight, ref_bias, ref_logps, *, hidden, weight, rows: int, fused: bool) -> None:
    """Exactly one of ``ref_hidden`` (with an optional ``ref_weight``/``ref_bias``) and ``ref_logps``."""
    if (ref_hidden is None) == (ref_logps is None):
        raise ValueError("pass exactly one of ref_hidden (the reference model's hidden states) or ref_logps (2B,)")
    if ref_logps is not None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias go with ref_hidden; with ref_logps there is nothing to project")
        _require_tensor("ref_logps", ref_logps)
        _require_float("ref_logps", ref_logps)
        _require_shape("ref_logps", ref_logps, (rows,), "(2B,)")
        _require_device("ref_logps", ref_logps, hidden.device)
        return
    _require_tensor("ref_hidden", ref_hidden)
    _require_float("ref_hidden", ref_hidden)
    _require_device("ref_hidden", ref_hidden, hidden.device)
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden must have the tokens of hidden {tuple(hidden.shape[:-1])} (+ H), got {tuple(ref_hidden.shape)}"
        )
    w = weight if ref_weight is None else ref_weight
    if ref_weight is not None:
        _require_tensor("ref_weight", ref_weight)
        _require_float("ref_weight", ref_weight)
        _require_device("ref_weight", ref_weight, hidden.device)
        if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must be (V, H_ref) with V = {weight.shape[0]}, got {tuple(ref_weight.shape)}")
    if ref_hidden.shape[-1] != w.shape[1]:
        raise ValueError(f"ref_hidden has H={ref_hidden.shape[-1]} but the reference weight is {tuple(w.shape)}")
    if ref_bias is not None and ref_weight is None:
        raise ValueError(
            "ref_bias goes with ref_weight: with ref_weight=None the reference uses the policy's weight and bias"
        )
    if ref_bias is not None:
        _require_tensor("ref_bias", ref_bias)
        _require_float("ref_bias", ref_bias)
        _require_shape("ref_bias", ref_bias, (w.shape[0],), "(V,)")
        _require_device("ref_bias", ref_bias, hidden.device)


def check_budget(memory_budget) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    return int(memory_budget)
