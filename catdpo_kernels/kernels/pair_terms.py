"""Triton pair kernel: margin gather, ``h``, ``z``, ``ℓ``, ``∂ℓ/∂h`` and the per-pair stats row."""

import triton
import triton.language as tl

# loss_type codes (constexpr)
DPO, IPO, SAFEDPO, CATDPO = 0, 1, 2, 3
LOSS_CODES = {"dpo": DPO, "ipo": IPO, "safedpo": SAFEDPO, "catdpo": CATDPO}


@triton.jit
def pair_terms_kernel(
    policy_ptr,
    ref_ptr,
    cat_ptr,
    unsafe_ptr,
    margins_ptr,
    loss_ptr,
    dldh_ptr,
    stats_ptr,
    B,
    C,
    beta,
    margin,
    LOSS: tl.constexpr,
    CAT_MODE: tl.constexpr,  # 0: no categories, 1: (B,) ids, 2: (B, C) multi-hot
    HAS_UNSAFE: tl.constexpr,
    NUM_STATS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    live = i < B
    pw = tl.load(policy_ptr + i, mask=live, other=0.0).to(tl.float32)
    pl = tl.load(policy_ptr + B + i, mask=live, other=0.0).to(tl.float32)
    rw = tl.load(ref_ptr + i, mask=live, other=0.0).to(tl.float32)
    rl = tl.load(ref_ptr + B + i, mask=live, other=0.0).to(tl.float32)
    h = (pw - rw) - (pl - rl)

    # Δ per pair and whether the pair has a category (s = 1 when no flags are given).
    has_cat = tl.zeros([BLOCK_B], dtype=tl.int1)
    delta = tl.zeros([BLOCK_B], dtype=tl.float32)
    if CAT_MODE == 1:
        c = tl.load(cat_ptr + i, mask=live, other=-1).to(tl.int64)
        has_cat = c >= 0
        in_range = has_cat & (c < C)
        # An id outside [-1, C) (checks off) poisons the pair, whatever the loss
        # type, instead of reading out of bounds or passing as a plausible number.
        invalid = (c < -1) | (c >= C)
        if LOSS == 3:
            delta = tl.load(margins_ptr + tl.where(in_range, c, 0), mask=live & in_range, other=0.0).to(tl.float32)
    elif CAT_MODE == 2:
        best = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
        any_set = tl.zeros([BLOCK_B], dtype=tl.int32)
        cols = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            m2 = live[:, None] & (cc < C)[None, :]
            flags = tl.load(cat_ptr + i[:, None].to(tl.int64) * C + cc[None, :], mask=m2, other=0) != 0
            any_set = tl.maximum(any_set, tl.max(flags.to(tl.int32), axis=1))
            if LOSS == 3:
                d = tl.load(margins_ptr + cc, mask=cc < C, other=0.0).to(tl.float32)
                cand = tl.where(flags, d[None, :], -float("inf"))
                best = tl.maximum(best, tl.max(cand, axis=1))
        has_cat = any_set > 0
        if LOSS == 3:
            delta = tl.where(has_cat, best, 0.0)
    if LOSS == 2:
        delta = tl.zeros([BLOCK_B], dtype=tl.float32) + margin

    if HAS_UNSAFE:
        hw = tl.load(unsafe_ptr + i, mask=live, other=0.0).to(tl.float32)
        hl = tl.load(unsafe_ptr + B + i, mask=live, other=0.0).to(tl.float32)
        s = hl - hw
    else:
        s = has_cat.to(tl.float32)
    if LOSS <= 1:
        z = beta * h
    else:
        z = beta * h - s * delta

    if LOSS == 1:
        d_h = h - 1.0 / (2.0 * beta)
        loss = d_h * d_h
        dldh = 2.0 * d_h
    else:
        # softplus(−z) = max(−z, 0) + log1p(e^{−|z|}); log1p compensated by hand
        # (accurate where 1 + e rounds, at large |z|) since the interpreter has no log1p.
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) - ((u - 1.0) - e) / u)
        loss = tl.maximum(-z, 0.0) + log1p_e
        sig_neg_z = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # σ(−z)
        dldh = -beta * sig_neg_z

    if CAT_MODE == 1:
        loss = tl.where(invalid, float("nan"), loss)
        dldh = tl.where(invalid, float("nan"), dldh)

    bh = beta * h
    e_bh = tl.exp(-tl.abs(bh))
    unsafe_pref = tl.where(bh >= 0, e_bh / (1.0 + e_bh), 1.0 / (1.0 + e_bh))  # σ(−βh)

    tl.store(loss_ptr + i, loss, mask=live)
    tl.store(dldh_ptr + i, dldh, mask=live)
    row = stats_ptr + i.to(tl.int64) * NUM_STATS
    tl.store(row + 0, tl.where(live, 1.0, 0.0), mask=live)
    tl.store(row + 1, loss, mask=live)
    tl.store(row + 2, unsafe_pref, mask=live)
    tl.store(row + 3, (z > 0).to(tl.float32), mask=live)
    tl.store(row + 4, bh, mask=live)
    tl.store(row + 5, (h > 0).to(tl.float32), mask=live)
