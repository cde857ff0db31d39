"""Triton kernels of the fused LM head: fold a logits tile into per-token statistics, and turn it into its gradient.

A *tile* is ``(n, Vc)`` raw logits ``hidden @ weight[v0:v0+Vc].T`` written by a
cuBLAS GEMM in the compute dtype. Both kernels add the bias and apply the head's
transform (scale, soft-cap, temperature) on the fly, in fp32, so the tile is
read once per kernel and never rewritten before its gradient.

``fold_tile_kernel``: one program per token row, updating that token's running
``(max, sum of exp)`` (online log-sum-exp across vocabulary chunks), the target's
logit when the target falls in this chunk, and the optional metrics (``Σ e·z``
for the entropy, ``Σ z`` for the mean logit, and the largest logit before the
target, for an argmax that takes the first maximum). Each lane keeps its own
running max and sum; the lanes are combined once at the end of the row.

``grad_tile_kernel``: ``g·(onehot − softmax)`` times the transform's derivative,
written over the tile in place, with the target entry computed as ``g·(1 − p)``.
"""

import triton
import triton.language as tl

from .rounding import round_to

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    y = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(u) = 2·σ(2u) − 1, which the interpreter and every GPU evaluate the same way
        y = softcap * (2.0 * tl.sigmoid(2.0 * y * inv_softcap) - 1.0)
    return y * inv_temp


@triton.jit
def fold_tile_kernel(
    tile_ptr,
    stride_tile,
    bias_ptr,
    targets_ptr,
    max_ptr,
    sum_ptr,
    target_logit_ptr,
    ez_ptr,
    zsum_ptr,
    before_ptr,
    v0,
    n_cols,
    logit_scale,
    inv_softcap,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    METRICS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = tile_ptr + row * stride_tile
    local_target = tl.load(targets_ptr + row) - v0
    cols = tl.arange(0, BLOCK_V)
    m_lane = tl.full([BLOCK_V], -float("inf"), tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    ez_lane = tl.zeros([BLOCK_V], tl.float32)
    z_lane = tl.zeros([BLOCK_V], tl.float32)
    before_lane = tl.full([BLOCK_V], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        live = offs < n_cols
        x = tl.load(base + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + v0 + offs, mask=live, other=0.0).to(tl.float32)
        z = _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(live, z, -float("inf"))
        m_new = tl.maximum(m_lane, z)
        # A lane that has only seen -inf keeps a zero sum (never exp(-inf - -inf)).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        scale = tl.exp2((m_lane - m_ref) * LOG2E)
        e = tl.exp2((z - m_ref) * LOG2E)
        s_lane = s_lane * scale + e
        if METRICS:
            z_fin = tl.where(live, z, 0.0)
            ez_lane = ez_lane * scale + e * z_fin
            z_lane += z_fin
            before_lane = tl.maximum(before_lane, tl.where(offs < local_target, z, -float("inf")))
        m_lane = m_new
    m_row = tl.max(m_lane, axis=0)
    m_old = tl.load(max_ptr + row)
    m_all = tl.maximum(m_row, m_old)
    m_ref = tl.where(m_all == -float("inf"), 0.0, m_all)
    lane_scale = tl.exp2((m_lane - m_ref) * LOG2E)
    old_scale = tl.exp2((m_old - m_ref) * LOG2E)
    tl.store(sum_ptr + row, tl.load(sum_ptr + row) * old_scale + tl.sum(s_lane * lane_scale, axis=0))
    tl.store(max_ptr + row, m_all)
    if METRICS:
        tl.store(ez_ptr + row, tl.load(ez_ptr + row) * old_scale + tl.sum(ez_lane * lane_scale, axis=0))
        tl.store(zsum_ptr + row, tl.load(zsum_ptr + row) + tl.sum(z_lane, axis=0))
        tl.store(before_ptr + row, tl.maximum(tl.load(before_ptr + row), tl.max(before_lane, axis=0)))
    if (local_target >= 0) & (local_target < n_cols):
        x = tl.load(base + local_target).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + v0 + local_target).to(tl.float32)
        tl.store(target_logit_ptr + row, _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SOFTCAP))


@triton.jit
def grad_tile_kernel(
    tile_ptr,
    stride_tile,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    g_ptr,
    v0,
    n_cols,
    logit_scale,
    inv_softcap,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(n, cdiv(n_cols, BLOCK_V))``: one block of one row, overwritten with its gradient."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    live = offs < n_cols
    ptrs = tile_ptr + row * stride_tile + offs
    x = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + v0 + offs, mask=live, other=0.0).to(tl.float32)
    y = x * logit_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * y * inv_softcap) - 1.0
        z = softcap * t * inv_temp
    else:
        z = y * inv_temp
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    p = tl.exp2((z - lse) * LOG2E)
    local_target = tl.load(targets_ptr + row) - v0
    # The target entry as g·(1 − p) in fp32, never a low-precision 1 − p.
    grad = tl.where(offs == local_target, g * (1.0 - p), -g * p)
    grad = grad * inv_temp
    if HAS_SOFTCAP:
        grad = grad * (1.0 - t * t)
    grad = grad * logit_scale
    tl.store(ptrs, round_to(grad, tile_ptr.dtype.element_ty), mask=live)
