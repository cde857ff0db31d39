"""Triton kernels for sequence log-probs: per-token online log-softmax + gather,
a deterministic per-row reduction, and the logits gradient.

Layout: logits are addressed as ``row * stride_r + t * stride_t + v`` (vocab
contiguous), with int64 offsets because ``2B·T·V`` exceeds 2**31. With
``shift_labels`` the token at ``t`` is scored against ``labels[:, t + 1]``;
the shift is a pointer offset, never a copy.

Issue cost matters as much as bytes here: an H200 streams a bf16 logit in well
under a cycle per SM lane, so the vocabulary loops are written to spend few
instructions per element:

* each row is split into a short masked *head* up to the first 16-byte-aligned
  element, an unmasked *body* of whole blocks whose alignment the compiler is
  told (so loads and stores stay vectorised even when ``V`` is not a multiple
  of 8, e.g. 50257), and a masked *tail*;
* the forward keeps a running ``(max, sum)`` per lane and combines the lanes
  once per row, instead of two block-wide reductions per block;
* exponentials are ``exp2`` of differences scaled to log2 units (an ``ex2`` without
  the range fix-ups of ``exp``);
* the backward compares vocabulary offsets with the label in int32;
* on a GPU, half-precision gradients are rounded by the conversion itself
  (``cvt.rn``); the integer rounding of ``rounding.round_to`` is kept for the
  interpreter (``INTERPRET``), which truncates, so both give the same bits.
"""

import triton
import triton.language as tl

from .rounding import round_to

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _fold(m_lane, s_lane, x, GROUP: tl.constexpr):
    """Fold one block of logits into the running ``(max, sum of exp(x − max))`` of its lanes.

    A lane covers ``GROUP`` consecutive logits (one thread's vector): their max is
    taken inside the thread, so the running sum is rescaled once per ``GROUP``
    elements instead of once per element. Differences are taken before scaling to
    log2 units, so that a large ``|max|`` costs no accuracy. ``m_lane`` starts at
    the lowest finite float rather than ``-inf``, so that ``exp2(-inf - -inf)``
    never arises and no per-element guard is needed.
    """
    xg = tl.reshape(x, [x.shape[0] // GROUP, GROUP])
    m_new = tl.maximum(m_lane, tl.max(xg, axis=1))
    e = tl.exp2((xg - m_new[:, None]) * LOG2E)
    s_lane = s_lane * tl.exp2((m_lane - m_new) * LOG2E) + tl.sum(e, axis=1)
    return m_new, s_lane


@triton.jit
def _row_split(off, V, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(head, n_full)``: elements before the first ``VEC``-aligned one, and the whole blocks after it."""
    head = tl.minimum((VEC - off % VEC) % VEC, V)
    return head, (V - head) // BLOCK_V


@triton.jit
def _score_token(
    logits_ptr, off, label, is_counted, V, VEC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr
):
    """One token: online fp32 log-sum-exp over the vocabulary, and the label's logit.

    Returns ``(max, log-sum, target logit)`` with ``lse = max + log-sum``; all 0
    for a token that is not counted, whose logits are then never read. ``max``
    and ``log-sum`` stay apart: one rounded fp32 ``lse`` would cost half an ulp
    of ``|max|`` in every log-prob, where ``log_softmax`` loses nothing.
    """
    cols = tl.arange(0, BLOCK_V)
    m_lane = tl.full([BLOCK_V // VEC], -3.4028234663852886e38, tl.float32)
    s_lane = tl.zeros([BLOCK_V // VEC], tl.float32)
    # A masked token (prompt, padding) costs no memory traffic at all.
    n_v = tl.where(is_counted, V, 0)
    head, n_full = _row_split(off, n_v, VEC, BLOCK_V)
    x = tl.load(logits_ptr + off + cols, mask=cols < head, other=-float("inf")).to(tl.float32)
    m_lane, s_lane = _fold(m_lane, s_lane, x, VEC)
    if ALIGNED:  # the base pointer is 16-byte aligned, so the body is too
        body = tl.multiple_of(off + head, VEC)
    else:
        body = off + head
    for b in range(0, n_full):
        x = tl.load(logits_ptr + body + b * BLOCK_V + cols).to(tl.float32)
        m_lane, s_lane = _fold(m_lane, s_lane, x, VEC)
    tail = head + n_full * BLOCK_V
    x = tl.load(logits_ptr + off + tail + cols, mask=tail + cols < n_v, other=-float("inf")).to(tl.float32)
    m_lane, s_lane = _fold(m_lane, s_lane, x, VEC)
    m = tl.max(m_lane, axis=0)
    s = tl.sum(s_lane * tl.exp2((m_lane - m) * LOG2E), axis=0)
    m = tl.where(is_counted, m, 0.0)
    logsum = tl.where(is_counted, tl.log(tl.where(is_counted, s, 1.0)), 0.0)
    in_range = is_counted & (label >= 0) & (label < V)
    target = tl.load(logits_ptr + off + tl.where(in_range, label, 0), mask=in_range, other=0.0).to(tl.float32)
    return m, logsum, target


@triton.jit
def token_logps_kernel(
    policy_ptr,
    ref_ptr,
    labels_ptr,
    token_logp_ptr,
    max_logsum_ptr,
    T_eff,
    V,
    stride_pr,
    stride_pt,
    stride_rr,
    stride_rt,
    stride_lr,
    stride_lt,
    ignore_index,
    SHIFT: tl.constexpr,
    HAS_REF: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED_P: tl.constexpr,
    ALIGNED_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(2B·T', 1 or 2)``: one program per token; axis 1 picks policy or reference.

    Writes ``token_logp[side, row, t]`` (0 for ignored tokens, NaN for labels
    outside ``[0, V)``) and, for the policy, the fp32 ``(max, log-sum)`` of every
    token into ``max_logsum[0]`` and ``max_logsum[1]`` (each ``(2B, T')``) for the backward.
    ``VEC`` is the number of logits in 16 bytes; ``ALIGNED_P``/``ALIGNED_R``: the
    policy/reference base pointer is 16-byte aligned (the body's alignment hint holds).
    """
    tok = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    row = tok // T_eff
    t = tok % T_eff
    label = tl.load(labels_ptr + row * stride_lr + (t + SHIFT) * stride_lt).to(tl.int64)
    is_counted = label != ignore_index
    bad = is_counted & ((label < 0) | (label >= V))
    n_tokens = tl.num_programs(0).to(tl.int64)
    m = 0.0
    logsum = 0.0
    target = 0.0
    if side == 0:
        off = row * stride_pr + t * stride_pt
        m, logsum, target = _score_token(policy_ptr, off, label, is_counted, V, VEC, ALIGNED_P, BLOCK_V)
        tl.store(max_logsum_ptr + tok, m)
        tl.store(max_logsum_ptr + n_tokens + tok, logsum)
    elif HAS_REF:
        off = row * stride_rr + t * stride_rt
        m, logsum, target = _score_token(ref_ptr, off, label, is_counted, V, VEC, ALIGNED_R, BLOCK_V)
    logp = tl.where(is_counted, (target - m) - logsum, 0.0)
    logp = tl.where(bad, float("nan"), logp)
    tl.store(token_logp_ptr + side * n_tokens + tok, logp)


@triton.jit
def row_reduce_kernel(
    token_logp_ptr,
    labels_ptr,
    logps_ptr,
    counts_ptr,
    T_eff,
    stride_lr,
    stride_lt,
    ignore_index,
    n_rows,
    SHIFT: tl.constexpr,
    AVERAGE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid ``(2B, sides)``: fixed-order sum over tokens, so results are bitwise repeatable."""
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_T], dtype=tl.int32)
    src = token_logp_ptr + side * n_rows * T_eff + row * T_eff
    for t0 in range(0, T_eff, BLOCK_T):
        t = t0 + offs
        in_seq = t < T_eff
        acc += tl.load(src + t, mask=in_seq, other=0.0)
        label = tl.load(labels_ptr + row * stride_lr + (t + SHIFT) * stride_lt, mask=in_seq, other=ignore_index)
        cnt += (in_seq & (label != ignore_index)).to(tl.int32)
    total = tl.sum(acc, axis=0)
    count = tl.sum(cnt, axis=0)
    if AVERAGE:
        total = total / tl.maximum(count, 1).to(tl.float32)
    tl.store(logps_ptr + side * n_rows + row, total)
    if side == 0:
        tl.store(counts_ptr + row, count)


@triton.jit
def _store_grad(ptr, grad, mask, INTERPRET: tl.constexpr):
    if INTERPRET:
        tl.store(ptr, round_to(grad, ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, grad.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _neg_gp_block(x_ptr, g_ptr, mask, m, ls2, g, INTERPRET: tl.constexpr):
    """``−g·p`` with ``p = exp2((x − max)·log2e − log-sum·log2e)`` for one block (the target is fixed later)."""
    if mask is None:  # the aligned body: no mask, so the loads and stores stay vectorised
        x = tl.load(x_ptr).to(tl.float32)
    else:
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    _store_grad(g_ptr, -g * tl.exp2((x - m) * LOG2E - ls2), mask, INTERPRET)


@triton.jit
def logits_grad_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    max_logsum_ptr,
    g_seq_ptr,
    counts_ptr,
    T,
    T_eff,
    V,
    stride_xr,
    stride_xt,
    stride_gr,
    stride_gt,
    stride_lr,
    stride_lt,
    ignore_index,
    SHIFT: tl.constexpr,
    AVERAGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    SAME_PHASE: tl.constexpr,
    INTERPRET: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(2B·T,)``: ``grad = g_seq · mask · (onehot − exp(x − max − log-sum))``.

    Every position is written: ignored tokens and the position that
    ``shift_labels`` drops get exact zeros. ``grad_ptr`` may equal
    ``logits_ptr`` (in-place backward): each block is read before it is written,
    and the target's logit is read before the loop. ``ALIGNED``: the logits base
    pointer is 16-byte aligned; ``SAME_PHASE``: so is the gradient's, with row
    strides equal modulo 16 bytes, so the unmasked body is aligned for both.

    The loop writes ``−g·p`` everywhere, with no per-element comparison with the
    label; after a barrier (the loop's stores are then visible to the whole
    program) the target entry is rewritten as ``g·(1 − p)``, computed in fp32
    as ``g − g·p``, never as a low-precision ``1 − p``.
    """
    pos = tl.program_id(0).to(tl.int64)
    row = pos // T
    t = pos % T
    in_seq = t < T_eff
    label = tl.load(labels_ptr + row * stride_lr + (t + SHIFT) * stride_lt, mask=in_seq, other=ignore_index).to(
        tl.int64
    )
    is_counted = in_seq & (label != ignore_index)
    g = tl.load(g_seq_ptr + row).to(tl.float32)
    if AVERAGE:
        g = g / tl.maximum(tl.load(counts_ptr + row), 1).to(tl.float32)
    g = tl.where(is_counted, g, 0.0)
    n_tokens = tl.num_programs(0).to(tl.int64) // T * T_eff
    m = tl.load(max_logsum_ptr + row * T_eff + t, mask=is_counted, other=0.0)
    logsum = tl.load(max_logsum_ptr + n_tokens + row * T_eff + t, mask=is_counted, other=0.0)
    ls2 = logsum * LOG2E
    x_off = row * stride_xr + t * stride_xt
    g_off = row * stride_gr + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    if is_counted:
        # A label outside [0, V) has no entry to fix (its sequence is NaN already).
        in_range = (label >= 0) & (label < V)
        target = tl.where(in_range, label, 0)
        x_t = tl.load(logits_ptr + x_off + target, mask=in_range, other=0.0).to(tl.float32)
        head, n_full = _row_split(x_off, V, VEC, BLOCK_V)
        _neg_gp_block(logits_ptr + x_off + cols, grad_ptr + g_off + cols, cols < head, m, ls2, g, INTERPRET)
        if ALIGNED:
            x_body = tl.multiple_of(x_off + head, VEC)
        else:
            x_body = x_off + head
        if SAME_PHASE:
            g_body = tl.multiple_of(g_off + head, VEC)
        else:
            g_body = g_off + head
        for b in range(0, n_full):
            _neg_gp_block(
                logits_ptr + x_body + b * BLOCK_V + cols,
                grad_ptr + g_body + b * BLOCK_V + cols,
                None,
                m,
                ls2,
                g,
                INTERPRET,
            )
        tail = head + n_full * BLOCK_V
        c = tail + cols
        _neg_gp_block(logits_ptr + x_off + c, grad_ptr + g_off + c, c < V, m, ls2, g, INTERPRET)
        tl.debug_barrier()
        gp_t = g * tl.exp2((x_t - m) * LOG2E - ls2)
        _store_grad(grad_ptr + g_off + target, g - gp_t, in_range, INTERPRET)
    else:
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for zb in range(0, tl.cdiv(V, BLOCK_V)):
            c = zb * BLOCK_V + cols
            tl.store(grad_ptr + g_off + c, zeros, mask=c < V)
