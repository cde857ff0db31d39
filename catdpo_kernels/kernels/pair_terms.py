"""Triton pair kernel: margin gather, ``h``, ``z``, ``ℓ``, ``∂ℓ/∂h`` and the per-pair stats row."""

import triton
import triton.language as tl

from ..loss_types import FAMILIES

# Family codes the kernel branches on (constexpr), in catdpo_kernels.loss_types order.
SIGMOID = tl.constexpr(FAMILIES.index("sigmoid"))
IPO = tl.constexpr(FAMILIES.index("ipo"))


@triton.jit
def _sigmoid_terms(z, beta):
    """``softplus(−z)`` and ``∂ℓ/∂h = −β·σ(−z)``, stable at any ``|z|``."""
    # softplus(−z) = max(−z, 0) + log1p(e^{−|z|}); log1p compensated by hand
    # (accurate where 1 + e rounds, at large |z|) since the interpreter has no log1p.
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) - ((u - 1.0) - e) / u)
    loss = tl.maximum(-z, 0.0) + log1p_e
    sig_neg_z = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    return loss, -beta * sig_neg_z


@triton.jit
def pair_terms_kernel(
    policy_ptr,
    ref_ptr,
    rows_ptr,
    member_ptr,
    table_ptr,
    signs_ptr,
    loss_ptr,
    dldh_ptr,
    stats_ptr,
    B,
    NUM_ROWS,
    beta,
    FAMILY: tl.constexpr,
    MULTI_HOT: tl.constexpr,  # False: rows_ptr holds one stats row per pair; True: member_ptr is (B, NUM_ROWS)
    NUM_STATS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    live = i < B
    pw = tl.load(policy_ptr + i, mask=live, other=0.0)
    pl = tl.load(policy_ptr + B + i, mask=live, other=0.0)
    rw = tl.load(ref_ptr + i, mask=live, other=0.0)
    rl = tl.load(ref_ptr + B + i, mask=live, other=0.0)
    h = (pw - rw) - (pl - rl)

    # Δ per pair: the margin table indexed by the pair's row(s). Rows were made
    # in-bounds by the canonicalisation (the invalid row holds NaN).
    if MULTI_HOT:
        delta = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
        cols = tl.arange(0, BLOCK_C)
        for c0 in range(0, NUM_ROWS, BLOCK_C):
            cc = c0 + cols
            m2 = live[:, None] & (cc < NUM_ROWS)[None, :]
            flags = tl.load(member_ptr + i[:, None].to(tl.int64) * NUM_ROWS + cc[None, :], mask=m2, other=0) != 0
            d = tl.load(table_ptr + cc, mask=cc < NUM_ROWS, other=0.0)
            delta = tl.maximum(delta, tl.max(tl.where(flags, d[None, :], -float("inf")), axis=1))
        delta = tl.where(live, delta, 0.0)  # lanes past the last pair never computed 0·(−inf)
    else:
        r = tl.load(rows_ptr + i, mask=live, other=0)
        delta = tl.load(table_ptr + r, mask=live, other=0.0)
    s = tl.load(signs_ptr + i, mask=live, other=0.0)
    z = beta * h - s * delta

    if FAMILY == IPO:
        d_h = h - 1.0 / (2.0 * beta)
        loss = d_h * d_h
        dldh = 2.0 * d_h
    else:
        loss, dldh = _sigmoid_terms(z, beta)

    # An invalid category id or unsafe flag (checks off) poisons the pair, whatever the family.
    poison = (delta != delta) | (s != s)
    loss = tl.where(poison, float("nan"), loss)
    dldh = tl.where(poison, float("nan"), dldh)

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
    tl.store(row + 6, (h == 0).to(tl.float32), mask=live)
