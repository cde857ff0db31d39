"""Segmented sums of per-pair rows into per-category rows.

``segment_reduce(values (N, K), segment_ids, num_segments) -> (num_segments + 1, K)`` fp32:
``segment_ids`` is ``(N,)`` int64 with ``-1`` for the extra "none" row, or an
``(N, num_segments)`` bool multi-hot matrix whose pairs count in every row they
carry and whose all-false rows go to the "none" row. Ids outside
``[-1, num_segments)`` count nowhere. Sums are taken in float64 in a fixed order:
repeated runs are bitwise identical, and a non-finite value only reaches the rows
its pair belongs to.

The compiled ``torch.ops.catdpo.segment_reduce`` (``csrc/``, loaded by
``catdpo_kernels._ext``; differentiable once ``compiled_op_available`` has run)
does the work when it is available for the device; ``segment_reduce_torch`` is
the pure-torch fallback with the same contract. Neither synchronises with the host.

This is the op's own, general contract, which embedders may call directly. The
package itself passes canonical row ids (``CategoryAssignment.segment_ids``).
"""

from __future__ import annotations

import torch

from .. import _ext

# Rows per dense membership block of the fallback: bounds its (rows, C+1) float64 temporary.
_FALLBACK_CHUNK_ROWS = 1 << 16


def _check_args(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> None:
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    if values.dim() != 2:
        raise ValueError(f"values must be (N, K), got shape {tuple(values.shape)}")
    n = values.shape[0]
    if segment_ids.dtype == torch.bool:
        if segment_ids.dim() != 2 or segment_ids.shape[0] != n or segment_ids.shape[1] != num_segments:
            raise ValueError(
                f"multi-hot segment_ids must be (N, num_segments) = ({n}, {num_segments}), "
                f"got {tuple(segment_ids.shape)}"
            )
    elif segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex:
        raise ValueError(f"segment_ids must be integer ids or a bool multi-hot matrix, got {segment_ids.dtype}")
    elif segment_ids.dim() != 1 or segment_ids.shape[0] != n:
        raise ValueError(f"segment_ids must be (N,) = ({n},), got shape {tuple(segment_ids.shape)}")


def _membership(segment_ids: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n, num_segments + 1)`` 0/1 matrix; an out-of-range id matches no column."""
    if segment_ids.dim() == 2:
        return torch.cat([segment_ids, ~segment_ids.any(-1, keepdim=True)], dim=1).to(dtype)
    target = torch.arange(num_segments + 1, device=segment_ids.device)
    target[num_segments] = -1
    return (segment_ids.unsqueeze(-1) == target).to(dtype)


def segment_reduce_torch(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Pure-torch implementation: float64 membership matmuls over fixed row blocks.

    A dense matmul would spread one NaN/inf into every row (``0 · inf = NaN``), so
    non-finite entries are summed separately, as counts, and put back only in
    their own rows: the result equals an ``index_add_`` in float64.
    """
    _check_args(values, segment_ids, num_segments)
    if segment_ids.dtype != torch.bool:
        segment_ids = segment_ids.long()
    v = values.to(torch.float64)
    n, k = v.shape
    finite_v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    special = torch.cat([v.isnan(), v == float("inf"), v == float("-inf")], dim=1).to(torch.float64)
    sums = v.new_zeros(num_segments + 1, k)
    counts = v.new_zeros(num_segments + 1, 3 * k)
    for start in range(0, n, _FALLBACK_CHUNK_ROWS):
        stop = min(n, start + _FALLBACK_CHUNK_ROWS)
        member_t = _membership(segment_ids[start:stop], num_segments, torch.float64).T
        sums = sums + member_t @ finite_v[start:stop]
        counts = counts + member_t @ special[start:stop]
    nan, pos, neg = counts[:, :k], counts[:, k : 2 * k], counts[:, 2 * k :]
    out = torch.where(pos > 0, torch.full_like(sums, float("inf")), sums)
    out = torch.where(neg > 0, torch.full_like(out, float("-inf")), out)
    out = torch.where((nan > 0) | ((pos > 0) & (neg > 0)), torch.full_like(out, float("nan")), out)
    return out.float()


def segment_gather(table: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Adjoint of the segment sum: row ``i`` gets the sum of the table rows pair ``i`` counts in."""
    if segment_ids.dim() == 2:
        none = (~segment_ids.any(-1, keepdim=True)).to(table.dtype)
        return segment_ids.to(table.dtype) @ table[:num_segments] + none * table[num_segments]
    ids = segment_ids.long()
    valid = (ids >= -1) & (ids < num_segments)
    row = torch.where(ids < 0, torch.full_like(ids, num_segments), ids)
    row = torch.where(valid, row, torch.full_like(ids, num_segments + 1))
    padded = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return padded[row]


def _setup_context(ctx, inputs, output):
    _, segment_ids, num_segments = inputs
    ctx.save_for_backward(segment_ids)
    ctx.num_segments = num_segments


def _backward(ctx, grad):
    (segment_ids,) = ctx.saved_tensors
    return segment_gather(grad, segment_ids, ctx.num_segments), None, None


_autograd_registered = False


def _register_autograd() -> None:
    """Make the compiled op differentiable in ``values`` like the fallback (once, after it loaded)."""
    global _autograd_registered
    if not _autograd_registered:
        torch.library.register_autograd(_ext.OP_NAME, _backward, setup_context=_setup_context)
        _autograd_registered = True


def compiled_op_available(device_type: str = "cpu") -> bool:
    """Load the compiled op (first call) and make it differentiable; True if it has a kernel for the device."""
    if not _ext.has_compiled_op(device_type):
        return False
    _register_autograd()
    return True


def _use_compiled(device_type: str) -> bool:
    if torch.compiler.is_compiling():
        # Tracing must never trigger a build; use what eager execution already loaded.
        return _ext.compiled_kernel_loaded(device_type)
    return compiled_op_available(device_type)


def segment_reduce(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The package's single entry point: compiled op when loaded for the device, else the fallback."""
    _check_args(values, segment_ids, num_segments)
    if segment_ids.dtype != torch.bool:
        segment_ids = segment_ids.long()
    values = values.float()
    if _use_compiled(values.device.type):
        return torch.ops.catdpo.segment_reduce(values, segment_ids, num_segments)
    return segment_reduce_torch(values, segment_ids, num_segments)
