"""Triton kernels of the fused LM head: fold a logits tile into per-token statistics, and turn it into its gradient.

A *tile* is ``(n, Vc)`` raw logits ``hidden @ weight[v0:v0+Vc].T`` written by a
cuBLAS GEMM in the compute dtype, with its row stride padded to a multiple of 16
elements so that every row starts 16-byte aligned (vectorised loads and stores
whatever the chunk width). Both kernels add the bias and apply the head's
transform (scale, soft-cap, temperature: compiled out when absent) on the fly,
in fp32, and run one program per tile row.

``fold_tile_kernel`` updates the row's running ``(max, sum of exp)`` (an online
log-sum-exp across vocabulary chunks), the target's logit when the target falls
in this chunk, and, when asked (``METRICS``), ``Σ e·z`` for the entropy, ``Σ z``
for the mean logit, and the largest logit before the target (for an argmax that
takes the first maximum). Lanes group the ``GROUP`` logits of one 16-byte
vector: their max is taken inside the thread, the running sum is rescaled once
per group, and the lanes are combined once per row.

``grad_tile_kernel`` writes ``−g·p`` times the transform's derivative over the
row in place, with no per-element comparison; after a barrier the target entry
is rewritten as ``g·(1 − p)`` (computed as ``g − g·p`` in fp32). On a GPU the
conversion to the tile's dtype rounds; under the interpreter (``INTERPRET``),
which truncates, ``rounding.round_to`` gives the same bits.
"""

import triton
import triton.language as tl

from .rounding import round_to

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(u) = 2·σ(2u) − 1, which the interpreter and every GPU evaluate the same way
        x = softcap * (2.0 * tl.sigmoid(2.0 * x * inv_softcap) - 1.0)
    if HAS_SCALE:
        x = x * inv_temp
    return x


@triton.jit
def _load_z(
    ptr,
    bias_ptr,
    cols,
    mask,
    logit_scale,
    inv_softcap,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Transformed logits of one block (``mask=None``: the unmasked, vectorised body)."""
    if mask is None:
        x = tl.load(ptr + cols).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols).to(tl.float32)
    else:
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _fold_block(
    m_lane,
    s_lane,
    ez_lane,
    z_lane,
    before_lane,
    z,
    cols,
    local_target,
    LANES: tl.constexpr,
    GROUP: tl.constexpr,
    METRICS: tl.constexpr,
):
    """Fold one block of transformed logits ``z`` (``-inf`` where masked) into the lane statistics."""
    zg = tl.reshape(z, [LANES, GROUP])
    m_new = tl.maximum(m_lane, tl.max(zg, axis=1))
    scale = tl.exp2((m_lane - m_new) * LOG2E)
    e = tl.exp2((zg - m_new[:, None]) * LOG2E)
    s_lane = s_lane * scale + tl.sum(e, axis=1)
    if METRICS:
        finite = tl.where(zg > -float("inf"), zg, 0.0)
        ez_lane = ez_lane * scale + tl.sum(e * finite, axis=1)
        z_lane += tl.sum(finite, axis=1)
        before = tl.where(tl.reshape(cols, [LANES, GROUP]) < local_target, zg, -float("inf"))
        before_lane = tl.maximum(before_lane, tl.max(before, axis=1))
    return m_new, s_lane, ez_lane, z_lane, before_lane


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
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    METRICS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = tile_ptr + row * stride_tile
    bias = bias_ptr + v0
    local_target = (tl.load(targets_ptr + row) - v0).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    LANES: tl.constexpr = BLOCK_V // GROUP
    m_lane = tl.full([LANES], LOWEST, tl.float32)
    s_lane = tl.zeros([LANES], tl.float32)
    ez_lane = tl.zeros([LANES], tl.float32)
    z_lane = tl.zeros([LANES], tl.float32)
    before_lane = tl.full([LANES], -float("inf"), tl.float32)
    args = (logit_scale, inv_softcap, softcap, inv_temp, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    n_full = n_cols // BLOCK_V
    for b in range(0, n_full):
        c = b * BLOCK_V + cols
        z = _load_z(base + b * BLOCK_V, bias + b * BLOCK_V, cols, None, *args)
        m_lane, s_lane, ez_lane, z_lane, before_lane = _fold_block(
            m_lane, s_lane, ez_lane, z_lane, before_lane, z, c, local_target, LANES, GROUP, METRICS
        )
    c = n_full * BLOCK_V + cols
    z = _load_z(base + n_full * BLOCK_V, bias + n_full * BLOCK_V, cols, c < n_cols, *args)
    z = tl.where(c < n_cols, z, -float("inf"))
    m_lane, s_lane, ez_lane, z_lane, before_lane = _fold_block(
        m_lane, s_lane, ez_lane, z_lane, before_lane, z, c, local_target, LANES, GROUP, METRICS
    )
    # Combine the lanes with the row's state from earlier chunks.
    m_old = tl.load(max_ptr + row)
    m_all = tl.maximum(tl.max(m_lane, axis=0), m_old)
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
            x += tl.load(bias + local_target).to(tl.float32)
        z_t = _transform(x, logit_scale, inv_softcap, softcap, inv_temp, HAS_SCALE, HAS_SOFTCAP)
        tl.store(target_logit_ptr + row, z_t)


@triton.jit
def _store(ptr, value, mask, INTERPRET: tl.constexpr):
    if INTERPRET:
        value = round_to(value, ptr.dtype.element_ty)
    else:
        value = value.to(ptr.dtype.element_ty)
    if mask is None:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _minus_gp(z, lse, g, TARGET: tl.constexpr):
    """``−g·p`` (for the target ``g − g·p``, in fp32: never a low-precision ``1 − p``)."""
    gp = g * tl.exp2((z - lse) * LOG2E)
    if TARGET:
        return g - gp
    return -gp


@triton.jit
def _grad_value(
    x,
    lse,
    g,
    logit_scale,
    inv_softcap,
    softcap,
    inv_temp,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    TARGET: tl.constexpr,
):
    """The gradient of raw logits ``x``: ``∂ℓ/∂z`` times the transform's derivative."""
    y = x
    if HAS_SCALE:
        y = y * logit_scale
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * y * inv_softcap) - 1.0
        z = softcap * th
        if HAS_SCALE:
            z = z * inv_temp
        grad = _minus_gp(z, lse, g, TARGET) * (1.0 - th * th)
    else:
        z = y
        if HAS_SCALE:
            z = z * inv_temp
        grad = _minus_gp(z, lse, g, TARGET)
    if HAS_SCALE:
        grad = grad * (inv_temp * logit_scale)
    return grad


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
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(n,)``: one row of the tile, overwritten with its gradient."""
    row = tl.program_id(0).to(tl.int64)
    base = tile_ptr + row * stride_tile
    bias = bias_ptr + v0
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    local_target = (tl.load(targets_ptr + row) - v0).to(tl.int32)
    has_target = (local_target >= 0) & (local_target < n_cols)
    safe_target = tl.where(has_target, local_target, 0)
    # The target's raw logit is read before the loop overwrites the row.
    x_t = tl.load(base + safe_target, mask=has_target, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x_t += tl.load(bias + safe_target, mask=has_target, other=0.0).to(tl.float32)
    args = (logit_scale, inv_softcap, softcap, inv_temp, HAS_SCALE, HAS_SOFTCAP)
    cols = tl.arange(0, BLOCK_V)
    n_full = n_cols // BLOCK_V
    for b in range(0, n_full):
        ptrs = base + b * BLOCK_V + cols
        x = tl.load(ptrs).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias + b * BLOCK_V + cols).to(tl.float32)
        _store(ptrs, _grad_value(x, lse, g, *args, False), None, INTERPRET)
    c = n_full * BLOCK_V + cols
    live = c < n_cols
    x = tl.load(base + c, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias + c, mask=live, other=0.0).to(tl.float32)
    _store(base + c, _grad_value(x, lse, g, *args, False), live, INTERPRET)
    tl.debug_barrier()
    _store(base + safe_target, _grad_value(x_t, lse, g, *args, True), has_target, INTERPRET)
