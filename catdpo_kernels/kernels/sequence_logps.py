"""Triton kernels for sequence log-probs: per-token online log-softmax + gather,
a deterministic per-row reduction, and the logits gradient.

Layout: logits are addressed as ``row * stride_r + t * stride_t + v`` (vocab
contiguous), with int64 offsets because ``2B·T·V`` exceeds 2**31. With
``shift_labels`` the token at ``t`` is scored against ``labels[:, t + 1]``;
the shift is a pointer offset, never a copy.
"""

import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _score_token(
    logits_ptr,
    stride_r,
    stride_t,
    row,
    t,
    label,
    is_counted,
    V,
    BLOCK_V: tl.constexpr,
):
    """One token: online fp32 log-sum-exp over vocab blocks, and the label's logit.

    Returns ``(max, log-sum, target logit)`` with ``lse = max + log-sum``; all 0
    for a token that is not counted, whose logits are then never read. ``max``
    and ``log-sum`` stay apart: one rounded fp32 ``lse`` would cost half an ulp
    of ``|max|`` in every log-prob, where ``log_softmax`` loses nothing.
    """
    base = logits_ptr + row * stride_r + t * stride_t
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    # A masked token (prompt, padding) costs no memory traffic at all.
    n_blocks = tl.where(is_counted, tl.cdiv(V, BLOCK_V), 0)
    for b in range(0, n_blocks):
        offs = b * BLOCK_V + cols
        x = tl.load(base + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Logits of -inf (masked vocab entries) must not turn exp(-inf - -inf) into NaN.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    m = tl.where(is_counted, m, 0.0)
    logsum = tl.where(is_counted, tl.log(tl.where(is_counted, s, 1.0)), 0.0)
    in_range = is_counted & (label >= 0) & (label < V)
    target = tl.load(base + tl.where(in_range, label, 0), mask=in_range, other=0.0).to(tl.float32)
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
    BLOCK_V: tl.constexpr,
):
    """Grid ``(2B·T', 1 or 2)``: one program per token; axis 1 picks policy or reference.

    Writes ``token_logp[side, row, t]`` (0 for ignored tokens, NaN for labels
    outside ``[0, V)``) and, for the policy, the fp32 ``(max, log-sum)`` of every
    token into ``max_logsum[0]`` and ``max_logsum[1]`` (each ``(2B, T')``) for the backward.
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
        m, logsum, target = _score_token(policy_ptr, stride_pr, stride_pt, row, t, label, is_counted, V, BLOCK_V)
        tl.store(max_logsum_ptr + tok, m)
        tl.store(max_logsum_ptr + n_tokens + tok, logsum)
    elif HAS_REF:
        m, logsum, target = _score_token(ref_ptr, stride_rr, stride_rt, row, t, label, is_counted, V, BLOCK_V)
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
    BLOCK_V: tl.constexpr,
):
    """Grid ``(2B·T,)``: ``grad = g_seq · mask · (onehot − exp(x − lse))``.

    Every position is written: ignored tokens and the position that
    ``shift_labels`` drops get exact zeros. ``grad_ptr`` may equal
    ``logits_ptr`` (in-place backward): each block is read before it is written.
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
    x_base = logits_ptr + row * stride_xr + t * stride_xt
    g_base = grad_ptr + row * stride_gr + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    if is_counted:
        for b in range(0, tl.cdiv(V, BLOCK_V)):
            offs = b * BLOCK_V + cols
            in_vocab = offs < V
            x = tl.load(x_base + offs, mask=in_vocab, other=0.0).to(tl.float32)
            p = tl.exp((x - m) - logsum)
            # Target entry in fp32 as g·(1 − p): never a low-precision 1 − p.
            grad = tl.where(offs == label, g * (1.0 - p), -g * p)
            tl.store(g_base + offs, round_to(grad, grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for b in range(0, tl.cdiv(V, BLOCK_V)):
            offs = b * BLOCK_V + cols
            tl.store(g_base + offs, zeros, mask=offs < V)
