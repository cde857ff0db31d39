"""Shared test helpers: random Cat-DPO batches, the float64 ground truth, and the
"no worse than naive" criterion (docs/design.md, "Testing").

Import from any test file as ``from _utils import ...`` (pytest puts ``tests/``
on ``sys.path`` through rootdir-relative imports; ``conftest.py`` lives there too).

Typical use::

    batch = make_batch(2, 7, 37, 3, torch.bfloat16, seed=1)
    exact_out, exact_grad = float64_reference(**batch, beta=0.1)
    naive_out, naive_grad = run_loss(batch, backend="reference", beta=0.1)
    fused_out, fused_grad = run_loss(batch, backend="torch", beta=0.1)
    assert_no_worse_than_naive(fused_grad, naive_grad, exact_grad, atol=1e-6, rtol=0.5, name="grad")
"""

from __future__ import annotations

import torch

import catdpo_kernels

IGNORE_INDEX = -100
FLOAT_KEYS = ("policy_logits", "ref_logits", "ref_logps", "margins")
TENSOR_KEYS = ("policy_logits", "labels", "categories", "margins", "ref_logits", "ref_logps", "unsafe")


def make_batch(
    B: int,
    T: int,
    V: int,
    C: int,
    dtype: torch.dtype = torch.float32,
    *,
    device="cpu",
    seed: int = 0,
    masked_frac: float = 0.25,
    fully_masked_rows=(),
    multi_hot: bool = False,
    with_unsafe: bool = True,
    non_contiguous: bool = False,
    shift: bool = False,
    ignore_index: int = IGNORE_INDEX,
    scale: float = 3.0,
) -> dict:
    """Fresh random inputs for ``catdpo_kernels.loss(**batch, ...)``.

    Returns a dict with ``policy_logits`` and ``ref_logits`` ``(2B, T, V)`` in ``dtype``
    (``scale``·randn so the softmax is far from flat; leaves without grad: call
    ``.requires_grad_()`` yourself), ``labels`` ``(2B, T)`` int64 with about
    ``masked_frac`` of the tokens set to ``ignore_index`` (every row keeps at least one
    counted token, except ``fully_masked_rows``, which have none), ``categories``
    (``(B,)`` int64 in ``[-1, C)`` with at least one ``-1`` and, for B >= 2, at least one
    real category; or ``(B, C)`` bool multi-hot with an all-false row when B >= 2),
    ``unsafe`` (``(2B,)`` int64 0/1, or None): chosen rows are safe, the rejected row of
    a pair with a category is unsafe (most pairs) or safe, pairs without a category are
    safe/safe; and ``margins`` ``(C,)`` fp32, positive.

    ``non_contiguous``: the logits are ``[:, :, :V]`` slices of a wider buffer (strided
    rows, contiguous vocab). ``shift``: the mask pattern is applied to the labels as
    ``shift_labels=True`` reads them (``labels[:, 1:]``); ``labels[:, 0]`` is always a
    valid token, so a fully masked row is fully masked only under the shift.
    """
    if C < 1:
        raise ValueError("make_batch needs C >= 1")
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * B

    def logits():
        width = V + 7 if non_contiguous else V
        x = torch.randn(rows, T, width, generator=gen, dtype=torch.float64) * scale
        x = x.to(dtype)
        return x[:, :, :V] if non_contiguous else x

    policy_logits = logits()
    ref_logits = logits()
    labels = torch.randint(0, V, (rows, T), generator=gen)
    start = 1 if shift else 0
    counted = T - start
    if counted < 1:
        raise ValueError("shift=True needs T >= 2")
    masked = torch.rand(rows, counted, generator=gen) < masked_frac
    # Keep at least one counted token in every row that is not meant to be empty.
    keep = torch.randint(0, counted, (rows,), generator=gen)
    masked[torch.arange(rows), keep] = False
    for r in fully_masked_rows:
        masked[r] = True
    labels[:, start:] = torch.where(masked, torch.full_like(labels[:, start:], ignore_index), labels[:, start:])

    if multi_hot:
        categories = torch.rand(B, C, generator=gen) < 0.4
        if B >= 2:
            categories[0] = False  # a pair with no category -> stats row C
            if not categories[1:].any():
                categories[1, torch.randint(0, C, (1,), generator=gen)] = True
        has_cat = categories.any(-1)
    else:
        categories = torch.randint(-1, C, (B,), generator=gen)
        categories[0] = -1
        if B >= 2 and not (categories[1:] >= 0).any():
            categories[1] = torch.randint(0, C, (1,), generator=gen)
        has_cat = categories >= 0

    unsafe = None
    if with_unsafe:
        rejected_unsafe = has_cat & (torch.rand(B, generator=gen) < 0.75)
        unsafe = torch.cat([torch.zeros(B, dtype=torch.int64), rejected_unsafe.long()])

    margins = torch.rand(C, generator=gen, dtype=torch.float64).mul(2.0).add(0.1).float()
    batch = dict(
        policy_logits=policy_logits,
        labels=labels,
        categories=categories,
        margins=margins,
        ref_logits=ref_logits,
        unsafe=unsafe,
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _upstream(loss: torch.Tensor, grad_out: torch.Tensor | None) -> torch.Tensor | None:
    if loss.dim() == 0:
        return None if grad_out is None else grad_out.to(loss.dtype)
    if grad_out is None:
        # A fixed, non-uniform upstream gradient for reduction="none".
        grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    return grad_out.to(device=loss.device, dtype=loss.dtype)


def run_loss(batch: dict, *, backend: str, upcast: bool = False, grad: bool = True, grad_out=None, **opts):
    """``loss(**batch, backend=backend, **opts)`` on fresh copies; returns ``(LossOutput, logits grad)``.

    The logits are cloned as leaves (their strides kept, so non-contiguous inputs stay
    non-contiguous) and get ``requires_grad`` when ``grad``; the loss is backpropagated
    (``grad_out`` or a fixed ramp for ``reduction="none"``) and the gradient returned,
    else ``None``. ``upcast``: every float tensor goes to float64 first.
    """
    kw = dict(backend=backend, upcast=upcast, grad=grad, grad_out=grad_out, logps_grad=False)
    out, grad_loss, _ = run_loss_and_logps_grad(batch, **kw, **opts)
    return out, grad_loss


def adapt_margins(kwargs: dict) -> dict:
    """Keep only the margin argument the loss type reads (``loss()`` refuses the others).

    ``make_batch`` always draws per-category ``margins``; for ``dpo``/``ipo``/``safedpo``
    they become ``num_categories`` (so the stats table keeps its C), and the scalar
    ``margin`` is kept for ``safedpo`` only.
    """
    loss_type = kwargs.get("loss_type", "catdpo")
    margins = kwargs.get("margins")
    if loss_type != "catdpo" and margins is not None and not isinstance(margins, float):
        kwargs["margins"] = None
        kwargs.setdefault("num_categories", margins.shape[0])
    if loss_type != "safedpo":
        kwargs.pop("margin", None)
    return kwargs


def logps_upstream(n: int) -> torch.Tensor:
    """A fixed upstream gradient for ``policy_logps``: both signs, no two entries equal."""
    ramp = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    return ramp * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat((n + 1) // 2)[:n]


def run_loss_and_logps_grad(
    batch: dict,
    *,
    backend: str,
    upcast: bool = False,
    grad: bool = True,
    grad_out=None,
    logps_grad: bool = True,
    **opts,
):
    """Like ``run_loss``, plus the logits gradient of ``Σ u·policy_logps`` for the fixed
    ``u = logps_upstream(2B)``: the sequence stage alone, free of the pair loss's
    conditioning (a tiny error in ``h`` moves ``σ(−z)`` by up to ``β·δh``).
    Returns ``(LossOutput, loss gradient, log-prob gradient)``.
    """
    kwargs = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if upcast and key in FLOAT_KEYS:
                value = value.to(torch.float64)
            if key == "policy_logits":
                value = _clone_keep_strides(value)
        kwargs[key] = value
    kwargs.update(opts)
    adapt_margins(kwargs)
    logits = kwargs["policy_logits"]
    if grad:
        logits.requires_grad_(True)
    out = catdpo_kernels.loss(backend=backend, **kwargs)
    if not grad:
        return out, None, None
    grad_logps = None
    if logps_grad:
        u = logps_upstream(out.policy_logps.numel()).to(out.policy_logps.dtype)
        (grad_logps,) = torch.autograd.grad(out.policy_logps, logits, grad_outputs=u, retain_graph=True)
    out.loss.backward(_upstream(out.loss, grad_out))
    return out, logits.grad, grad_logps


def float64_reference(grad: bool = True, grad_out=None, **kwargs):
    """The ground truth: ``backend="reference"`` on float64 copies of every float input.

    Takes ``loss()``'s keyword arguments (``**make_batch(...)`` plus options); returns
    ``(LossOutput, float64 logits gradient or None)``.
    """
    kwargs.pop("backend", None)
    return run_loss(kwargs, backend="reference", upcast=True, grad=grad, grad_out=grad_out)


def _clone_keep_strides(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with the same sizes and strides as ``x`` (views stay views of a new buffer)."""
    return x.clone() if x.is_contiguous() else _strided_copy(x)


def _strided_copy(x: torch.Tensor) -> torch.Tensor:
    """Copy ``x`` into a buffer with the same strides (including gaps), returned as a leaf view."""
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    storage = torch.full((span,), float("nan"), dtype=x.dtype, device=x.device)
    view = storage.as_strided(x.shape, x.stride())
    view.copy_(x)
    return view.detach()


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64; NaN in the same places counts as equal, elsewhere as inf."""
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    diff = (a - b).abs()
    diff = torch.where(nan_a, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isinf(a) & (a == b), torch.zeros_like(diff), diff)
    return float(diff.max())


def _worst(a: torch.Tensor, b: torch.Tensor) -> str:
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return ""
    diff = torch.nan_to_num((a - b).abs(), nan=float("inf"))
    idx = int(diff.reshape(-1).argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    return f"at {pos}: got {a.reshape(-1)[idx].item()!r}, exact {b.reshape(-1)[idx].item()!r}"


def assert_no_worse_than_naive(
    fused: torch.Tensor,
    naive: torch.Tensor,
    exact: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    name: str,
) -> None:
    """``err(fused) ≤ err(naive)·(1 + rtol) + atol``, errors as max-abs vs float64 (docs/design.md, "Testing").

    ``fused`` and ``naive`` are the same quantity computed in the same dtype by the
    fused backend and by the naive reference; ``exact`` is the float64 ground truth.
    NaNs must appear where ``exact`` has them. ``rtol`` is a relative slack on the
    naive error (rounding luck of the worst element), ``atol`` an absolute floor for
    when the naive path happens to be (nearly) exact.
    """
    if tuple(fused.shape) != tuple(exact.shape) or tuple(naive.shape) != tuple(exact.shape):
        raise AssertionError(
            f"{name}: shapes differ: fused {tuple(fused.shape)}, naive {tuple(naive.shape)}, exact {tuple(exact.shape)}"
        )
    if fused.dtype != naive.dtype:
        raise AssertionError(f"{name}: fused is {fused.dtype} but naive is {naive.dtype}; compare like with like")
    err_fused = max_abs_err(fused, exact)
    err_naive = max_abs_err(naive, exact)
    if err_naive == float("inf"):
        raise AssertionError(
            f"{name}: the naive path itself disagrees with float64 on NaN positions; {_worst(naive, exact)}"
        )
    bound = err_naive * (1.0 + rtol) + atol
    if not err_fused <= bound:
        scale = float(exact.detach().double().abs().nan_to_num(0.0).max()) if exact.numel() else 0.0
        raise AssertionError(
            f"{name} ({fused.dtype}): fused error {err_fused:.3e} > bound {bound:.3e} "
            f"= naive error {err_naive:.3e} * (1 + rtol={rtol}) + atol={atol:.1e}; "
            f"max |exact| = {scale:.3e}; worst fused element {_worst(fused, exact)}; "
            f"worst naive element {_worst(naive, exact)}"
        )


def assert_close_to_exact(actual: torch.Tensor, exact: torch.Tensor, *, atol: float, rtol: float, name: str) -> None:
    """``|actual - exact| ≤ atol + rtol·|exact|`` elementwise (NaN where ``exact`` is NaN)."""
    a = actual.detach().to(torch.float64).cpu()
    e = exact.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        raise AssertionError(f"{name}: NaN positions differ: got {a.tolist()}, exact {e.tolist()}")
    ok = torch.isnan(e) | ((a - e).abs() <= atol + rtol * e.abs())
    if not bool(ok.all()):
        raise AssertionError(
            f"{name}: max error {max_abs_err(a, e):.3e} exceeds atol={atol:.1e} + rtol={rtol:.1e}·|exact|; "
            f"{_worst(a, e)}"
        )


# Per-dtype tolerances for assert_no_worse_than_naive: (atol relative to the
# quantity's scale, relative slack on the naive error).
SLACK = {
    torch.float64: (1e-12, 1.0),
    torch.float32: (1e-6, 1.0),
    torch.bfloat16: (1e-6, 1.0),
    torch.float16: (1e-6, 1.0),
}


def _amax(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().nan_to_num(0.0).max()) if t.numel() else 0.0


def output_scales(exact_out, *, beta=None, loss_type=None) -> dict:
    """How large the rounding error of each ``LossOutput`` field can legitimately be, as a
    magnitude to multiply ``SLACK``'s atol by (its condition, not just its size).

    The log-probs are fp32 sums of ``T`` token terms, so their rounding scales with
    ``L = max|π| + max|ρ|``; rewards and the sigmoid-family loss see it times ``β``
    (``|∂ℓ/∂h| ≤ β``), IPO times ``2|h − 1/(2β)|``. Without ``beta`` every field is
    scaled by its own magnitude only.
    """
    size = {f: max(1.0, _amax(getattr(exact_out, f))) for f in exact_out._fields}
    if beta is None:
        return size
    logps = _amax(exact_out.policy_logps) + _amax(exact_out.ref_logps)
    rewards = beta * logps
    if loss_type == "ipo":
        h = (exact_out.chosen_rewards - exact_out.rejected_rewards) / beta
        loss = 2.0 * _amax(h - 1.0 / (2.0 * beta)) * logps
    else:
        loss = beta * logps
    scales = dict(size)
    for field, extra in (("chosen_rewards", rewards), ("rejected_rewards", rewards), ("loss", loss)):
        scales[field] = max(size[field], extra)
    scales["category_stats"] = max(size["category_stats"], loss, rewards)
    return scales


def compare_outputs(
    fused_out, naive_out, exact_out, *, dtype, fields=None, check_stats=True, beta=None, loss_type=None
) -> None:
    """Apply the no-worse criterion to every field of two ``LossOutput``s.

    ``category_stats`` columns are compared too; the integer-valued columns
    (count, margin_ok, reward_acc) must match the naive path exactly unless the
    float64 values sit on a decision boundary. Pass ``beta`` (and ``loss_type``)
    to scale the tolerance of the loss and rewards by their conditioning
    (see ``output_scales``); without it, by their magnitude.
    """
    atol, rtol = SLACK[dtype]
    scales = output_scales(exact_out, beta=beta, loss_type=loss_type)
    names = fields or ("loss", "policy_logps", "ref_logps", "chosen_rewards", "rejected_rewards")
    for field in names:
        f, n, e = getattr(fused_out, field), getattr(naive_out, field), getattr(exact_out, field)
        n = n.detach().to(f.dtype)
        assert_no_worse_than_naive(f.detach(), n, e, atol=atol * scales[field], rtol=rtol, name=field)
    if check_stats:
        f, n, e = fused_out.category_stats, naive_out.category_stats, exact_out.category_stats
        assert f.dtype == torch.float32, f"category_stats must be fp32, got {f.dtype}"
        assert f.shape == e.shape, f"category_stats shape {tuple(f.shape)} != {tuple(e.shape)}"
        assert_no_worse_than_naive(f, n, e, atol=2e-6 * scales["category_stats"], rtol=rtol, name="category_stats")


def _eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype the log-probs are accumulated in."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def loss_grad_condition(exact_out, *, dtype, beta, loss_type) -> float:
    """Relative error of the per-sequence scalar ``g_seq = ∂ℓ/∂π`` that rounding of ``h``
    alone causes: ``δh ≈ eps·L`` with ``L = max|π| + max|ρ|``, and ``δg/g ≈ β·δh`` for the
    sigmoid family, ``δh / |h − 1/(2β)|`` for IPO."""
    logps = _amax(exact_out.policy_logps) + _amax(exact_out.ref_logps)
    dh = 4.0 * _eps(dtype) * max(logps, 1.0)
    if loss_type == "ipo":
        h = (exact_out.chosen_rewards - exact_out.rejected_rewards).double() / beta
        gap = float((h - 1.0 / (2.0 * beta)).abs().min()) if h.numel() else 1.0
        return dh / max(gap, 1e-12)
    return beta * dh


def assert_backend_matches_reference(batch: dict, *, backend: str, grad_out=None, check_stats: bool = True, **opts):
    """Run ``backend`` and the naive reference in the batch's dtype, and the float64
    reference; apply the no-worse criterion to every output and to two logits gradients:
    the loss's (tolerance widened by ``loss_grad_condition``) and that of a fixed linear
    function of ``policy_logps`` (the sequence stage alone, strict tolerance).

    Returns ``(fused LossOutput, fused logits gradient, float64 LossOutput, float64 gradient)``.
    """
    dtype = batch["policy_logits"].dtype
    beta, loss_type = opts.get("beta", 0.1), opts.get("loss_type", "catdpo")
    kw = dict(grad_out=grad_out, **opts)
    exact, g_exact, s_exact = run_loss_and_logps_grad(batch, backend="reference", upcast=True, **kw)
    naive, g_naive, s_naive = run_loss_and_logps_grad(batch, backend="reference", **kw)
    fused, g_fused, s_fused = run_loss_and_logps_grad(batch, backend=backend, **kw)
    assert fused.loss.shape == exact.loss.shape, f"loss shape {tuple(fused.loss.shape)} != {tuple(exact.loss.shape)}"
    compare_outputs(fused, naive, exact, dtype=dtype, check_stats=check_stats, beta=beta, loss_type=loss_type)
    assert g_fused.dtype == dtype, f"logits gradient is {g_fused.dtype}, logits are {dtype}"
    assert g_fused.shape == batch["policy_logits"].shape
    atol, rtol = SLACK[dtype]
    cond = loss_grad_condition(exact, dtype=dtype, beta=beta, loss_type=loss_type)
    scale = max(_amax(g_exact), 1e-30)
    name = "logits gradient of the loss"
    assert_no_worse_than_naive(g_fused, g_naive, g_exact, atol=max(atol, cond) * scale, rtol=rtol, name=name)
    scale = max(_amax(s_exact), 1e-30)
    name = "logits gradient of u·policy_logps"
    assert_no_worse_than_naive(s_fused, s_naive, s_exact, atol=atol * scale, rtol=rtol, name=name)
    return fused, g_fused, exact, g_exact


# ------------------------------------------------------------------ the fused LM head (linear_loss)
HEAD_FLOAT_KEYS = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias", "ref_logps", "margins")
HEAD_GRAD_KEYS = ("hidden", "weight", "bias")


def make_head_batch(
    B: int,
    T: int,
    H: int,
    V: int,
    C: int,
    dtype: torch.dtype = torch.float32,
    *,
    device="cpu",
    seed: int = 0,
    packed: bool = False,
    masked_frac: float = 0.25,
    fully_masked_rows=(),
    empty_rows=(),
    multi_hot: bool = False,
    with_unsafe: bool = True,
    shift: bool = False,
    bias: bool = False,
    ref: str = "same",
    spread: float = 3.0,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """Fresh random inputs for ``catdpo_kernels.linear_loss(**batch, ...)``.

    ``hidden`` is ``(2B, T, H)`` (padded) or ``(N, H)`` with ``cu_seqlens`` (``packed``:
    random sequence lengths in ``[1, T]``, ``empty_rows`` of length 0); ``weight``
    ``(V, H)`` is scaled so that the logits have a spread of about ``spread`` units;
    ``bias`` an optional ``(V,)``. Labels are masked as in ``make_batch`` (every sequence
    keeps a counted token, except ``fully_masked_rows``; with ``shift`` the mask applies
    to the labels as ``shift_labels=True`` reads them). ``ref``: ``"same"`` (``ref_hidden``
    only: the policy head is reused), ``"head"`` (``ref_hidden`` with its own
    ``ref_weight``/``ref_bias``, of width ``H + 2``) or ``"logps"`` (``ref_logps`` given).
    Categories, unsafe flags and margins as in ``make_batch``.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * B

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if packed:
        low = 2 if shift else 1
        lengths = torch.randint(low, max(T, low) + 1, (rows,), generator=gen)
        for r in empty_rows:
            lengths[r] = 0
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        n = int(cu_seqlens[-1])
        lead = (n,)
        labels = torch.randint(0, V, lead, generator=gen)
        bounds = cu_seqlens.tolist()
        for s in range(rows):
            a, b = bounds[s], bounds[s + 1]
            start = a + (1 if shift else 0)
            if b <= start:
                continue
            masked = torch.rand(b - start, generator=gen) < masked_frac
            masked[int(torch.randint(0, b - start, (1,), generator=gen))] = False
            if s in fully_masked_rows:
                masked[:] = True
            labels[start:b] = torch.where(masked, ignore_index, labels[start:b])
    else:
        if empty_rows:
            raise ValueError("empty_rows needs packed=True")
        cu_seqlens = None
        lead = (rows, T)
        labels = torch.randint(0, V, lead, generator=gen)
        start = 1 if shift else 0
        if T - start < 1:
            raise ValueError("shift=True needs T >= 2")
        masked = torch.rand(rows, T - start, generator=gen) < masked_frac
        keep = torch.randint(0, T - start, (rows,), generator=gen)
        masked[torch.arange(rows), keep] = False
        for r in fully_masked_rows:
            masked[r] = True
        labels[:, start:] = torch.where(masked, ignore_index, labels[:, start:])

    hidden = randn(*lead, H)
    weight = randn(V, H, scale=spread / H**0.5)
    batch = dict(hidden=hidden, weight=weight, labels=labels, cu_seqlens=cu_seqlens)
    batch["bias"] = randn(V, scale=0.5) if bias else None
    if ref == "logps":
        counted = _head_counted(labels, cu_seqlens, shift, ignore_index)
        per_seq = _per_sequence(counted.double(), cu_seqlens)
        rate = torch.rand(rows, generator=gen, dtype=torch.float64) * 2.0 + 2.0
        batch["ref_logps"] = (-per_seq * rate).float()
    elif ref == "same":
        batch["ref_hidden"] = (hidden.double() + 0.3 * torch.randn(*lead, H, generator=gen, dtype=torch.float64)).to(
            dtype
        )
    elif ref == "head":
        batch["ref_hidden"] = randn(*lead, H + 2)
        batch["ref_weight"] = randn(V, H + 2, scale=spread / (H + 2) ** 0.5)
        batch["ref_bias"] = randn(V, scale=0.5)
    else:
        raise ValueError(f"ref must be 'same', 'head' or 'logps', got {ref!r}")

    if multi_hot:
        categories = torch.rand(B, C, generator=gen) < 0.4
        if B >= 2:
            categories[0] = False
            if not categories[1:].any():
                categories[1, torch.randint(0, C, (1,), generator=gen)] = True
        has_cat = categories.any(-1)
    else:
        categories = torch.randint(-1, C, (B,), generator=gen)
        categories[0] = -1
        if B >= 2 and not (categories[1:] >= 0).any():
            categories[1] = torch.randint(0, C, (1,), generator=gen)
        has_cat = categories >= 0
    batch["categories"] = categories
    batch["unsafe"] = None
    if with_unsafe:
        rejected_unsafe = has_cat & (torch.rand(B, generator=gen) < 0.75)
        batch["unsafe"] = torch.cat([torch.zeros(B, dtype=torch.int64), rejected_unsafe.long()])
    batch["margins"] = torch.rand(C, generator=gen, dtype=torch.float64).mul(2.0).add(0.1).float()
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _per_sequence(per_position: torch.Tensor, cu_seqlens) -> torch.Tensor:
    if cu_seqlens is None:
        return per_position.sum(-1)
    b = cu_seqlens.tolist()
    return torch.stack([per_position[x:y].sum() for x, y in zip(b[:-1], b[1:])])


def _head_counted(labels, cu_seqlens, shift: bool, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool mask over the label positions: which labels are scored (read and not ignored)."""
    counted = labels != ignore_index
    if not shift:
        return counted
    counted = counted.clone()
    if cu_seqlens is None:
        counted[:, 0] = False
    else:
        starts = cu_seqlens[:-1]
        counted[starts[starts < labels.shape[0]]] = False
    return counted


def head_counted_positions(labels, cu_seqlens=None, *, shift: bool = False, ignore_index: int = IGNORE_INDEX):
    """Bool mask over the *hidden* positions (``labels.shape``): which hidden rows are scored.

    Without ``shift`` position ``t`` is scored against ``labels[t]``; with ``shift``
    against ``labels[t + 1]`` of the same sequence (the last position of a sequence
    scores nothing).
    """
    scored = _head_counted(labels, cu_seqlens, shift, ignore_index)
    if not shift:
        return scored
    out = torch.zeros_like(scored)
    if cu_seqlens is None:
        out[:, :-1] = scored[:, 1:]
        return out
    out[:-1] = scored[1:]
    ends = cu_seqlens[1:] - 1
    out[ends[ends >= 0]] = False  # the last position of each sequence (never a sequence's own label)
    # A position whose next label belongs to the next sequence has been cleared by the shift mask
    # (starts are never counted); the explicit clear above covers empty sequences too.
    return out


class HeadRun:
    """One ``linear_loss`` call and its backward: ``out`` (``LossOutput``), ``metrics``,
    ``grads`` and ``logps_grads`` (dicts over ``hidden``/``weight``/``bias``, ``None`` where
    not trainable) and the leaves it ran on (``inputs``)."""

    def __init__(self, out, metrics, grads, logps_grads, inputs):
        self.out, self.metrics, self.grads, self.logps_grads, self.inputs = out, metrics, grads, logps_grads, inputs


def head_inputs(batch: dict, *, upcast: bool = False, frozen=(), grad: bool = True) -> dict:
    """Fresh leaf copies of a ``make_head_batch`` batch (float64 with ``upcast``); ``hidden``,
    ``weight`` and ``bias`` require grad unless ``frozen`` (or ``grad=False``)."""
    kwargs = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if upcast and key in HEAD_FLOAT_KEYS:
                value = value.to(torch.float64)
            if key in HEAD_GRAD_KEYS:
                value = value.clone().requires_grad_(grad and key not in frozen)
        kwargs[key] = value
    return kwargs


def run_linear_loss(
    batch: dict,
    *,
    backend: str,
    upcast: bool = False,
    grad: bool = True,
    grad_out=None,
    logps_grad: bool = False,
    frozen=(),
    extra_loss=None,
    autocast=None,
    **opts,
) -> HeadRun:
    """``linear_loss(**batch, backend=backend, **opts)`` on fresh leaves, then its backward.

    ``logps_grad``: also the gradients of ``Σ u·policy_logps`` (``u = logps_upstream``),
    taken first with ``retain_graph``. ``extra_loss(out)``: a term added to the loss
    before the backward (e.g. an SFT term on ``policy_logps``). ``autocast``: a dtype
    for ``torch.autocast("cpu", ...)`` around the forward. ``reduction="none"`` is
    backpropagated with ``grad_out`` or the fixed ramp of ``_upstream``.
    """
    kwargs = head_inputs(batch, upcast=upcast, frozen=frozen, grad=grad)
    kwargs.update(opts)
    adapt_margins(kwargs)
    leaves = {k: kwargs[k] for k in HEAD_GRAD_KEYS if kwargs.get(k) is not None and kwargs[k].requires_grad}
    want_metrics = bool(kwargs.get("return_metrics"))
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            result = catdpo_kernels.linear_loss(backend=backend, **kwargs)
    else:
        result = catdpo_kernels.linear_loss(backend=backend, **kwargs)
    out, metrics = result if want_metrics else (result, None)
    grads = logps_grads = None
    if grad and leaves:
        names = list(leaves)
        if logps_grad:
            u = logps_upstream(out.policy_logps.numel()).to(out.policy_logps)
            g = torch.autograd.grad(out.policy_logps, [leaves[k] for k in names], grad_outputs=u, retain_graph=True)
            logps_grads = dict(zip(names, g))
        total = out.loss
        upstream = _upstream(out.loss, grad_out)
        if extra_loss is not None:
            total = (total if upstream is None else (total * upstream).sum()) + extra_loss(out)
            upstream = None
        total.backward(upstream)
        grads = {k: leaves[k].grad for k in names}
    return HeadRun(out, metrics, grads, logps_grads, kwargs)


def assert_head_grads_no_worse(
    fused: dict, naive: dict, exact: dict, *, dtype, cond: float = 0.0, what: str = "", ideal: dict | None = None
):
    """The no-worse criterion for each gradient in ``exact`` (hidden, weight, bias), with an
    absolute floor of ``max(SLACK atol, cond)`` times the gradient's scale, and of
    ``(1 + rtol)`` times the error of ``ideal`` (``rounded_gemm_reference``'s gradients; a list:
    the worst of them) if given."""
    atol, rtol = SLACK[dtype]
    assert set(fused) == set(exact) == set(naive), f"gradients of {sorted(fused)} vs exact {sorted(exact)}"
    for key, e in exact.items():
        f, n = fused[key], naive[key]
        assert f is not None and n is not None, f"{what}{key}: no gradient"
        assert f.dtype == n.dtype, f"{what}{key} gradient is {f.dtype}, naive {n.dtype}"
        scale = max(_amax(e), 1e-30)
        floor = max(atol, cond) * scale
        for alt in [] if ideal is None else ideal if isinstance(ideal, list) else [ideal]:
            floor = max(floor, max_abs_err(alt[key], e) * (1 + rtol))
        assert_no_worse_than_naive(f, n, e, atol=floor, rtol=rtol, name=f"{what}gradient of {key}")


def assert_linear_matches_reference(
    batch: dict, *, backend: str, grad_out=None, check_stats: bool = True, logps_grad: bool = True, **opts
):
    """``linear_loss`` on ``backend`` against the naive path in the same dtype and the float64
    ground truth (both ``backend="reference"``): every ``LossOutput`` field, the gradients of
    the loss (tolerance widened by ``loss_grad_condition``) and, with ``logps_grad``, of
    ``Σ u·policy_logps`` (strict). Returns ``(fused HeadRun, float64 HeadRun)``.
    """
    dtype = batch["hidden"].dtype
    beta, loss_type = opts.get("beta", 0.1), opts.get("loss_type", "catdpo")
    kw = dict(grad_out=grad_out, logps_grad=logps_grad, **opts)
    exact = run_linear_loss(batch, backend="reference", upcast=True, **kw)
    naive = run_linear_loss(batch, backend="reference", **kw)
    fused = run_linear_loss(batch, backend=backend, **kw)
    ideal_run = ideal = None
    if dtype in (torch.bfloat16, torch.float16):
        ideal_run = rounded_gemm_reference(batch, dtype, **kw)
        ideal = ideal_run.out
    assert fused.out.loss.shape == exact.out.loss.shape
    compare_head_outputs(
        fused.out,
        naive.out,
        exact.out,
        dtype=dtype,
        check_stats=check_stats,
        beta=beta,
        loss_type=loss_type,
        ideal_out=ideal,
    )
    if fused.grads is not None:
        for key, g in fused.grads.items():
            assert g.dtype == fused.inputs[key].dtype and g.shape == fused.inputs[key].shape, key
        cond = head_grad_condition(naive.out, exact.out, dtype=dtype, beta=beta, loss_type=loss_type, ideal_out=ideal)
        assert_head_grads_no_worse(
            fused.grads,
            naive.grads,
            exact.grads,
            dtype=dtype,
            cond=cond,
            what="loss ",
            ideal=None if ideal_run is None else [ideal_run.grads, ideal_run.grads_rounded],
        )
        if logps_grad:
            assert_head_grads_no_worse(
                fused.logps_grads,
                naive.logps_grads,
                exact.logps_grads,
                dtype=dtype,
                what="u·policy_logps ",
                ideal=None if ideal_run is None else [ideal_run.logps_grads, ideal_run.logps_grads_rounded],
            )
    return fused, exact


def rounded_gemm_reference(batch: dict, dtype: torch.dtype, *, frozen=(), **opts) -> HeadRun:
    """float64 math on the head GEMM's output rounded to ``dtype``: outputs and gradients.

    A half-precision head (or one under autocast) rounds every logit ``hidden @ W.T`` to
    bf16/fp16 once, on the naive path and on the fused one alike; this is the result of
    exact arithmetic after that one unavoidable rounding. It runs ``linear_loss`` on
    ``backend="reference"`` with the rounded logits ``z`` as float64 "hidden states" and an
    identity float64 "weight", so the bias, the transform and the pair stage are exact;
    the gradients of ``hidden`` and ``weight`` are then ``G_z @ W`` and ``G_zᵀ @ hidden``
    in float64 (with the ``dtype``-rounded ``hidden`` and ``W`` the GEMM read).
    Takes ``run_linear_loss``'s options (``grad``, ``logps_grad``, ``grad_out``, ``extra_loss``).
    """
    kw = head_inputs(batch, grad=False)
    vocab = kw["weight"].shape[0]
    eye = torch.eye(vocab, dtype=torch.float64, device=kw["weight"].device)

    def rounded(h, w):
        return (h.to(dtype) @ w.to(dtype).t()).double()

    def dbl(t):
        return None if t is None else t.double()

    new = dict(kw, hidden=rounded(kw["hidden"], kw["weight"]), weight=eye, bias=dbl(kw.get("bias")))
    if kw.get("ref_hidden") is not None:
        own = kw.get("ref_weight") is not None
        ref_w = kw["ref_weight"] if own else kw["weight"]
        ref_b = kw.get("ref_bias") if own else kw.get("bias")
        new.update(ref_hidden=rounded(kw["ref_hidden"], ref_w), ref_weight=eye, ref_bias=dbl(ref_b))
    if kw.get("ref_logps") is not None:
        new["ref_logps"] = kw["ref_logps"].double()
    if kw.get("margins") is not None:
        new["margins"] = kw["margins"].double()
    opts = {k: v for k, v in opts.items() if k != "autocast"}
    run = run_linear_loss(new, backend="reference", frozen=("weight", *(("bias",) if "bias" in frozen else ())), **opts)
    h = kw["hidden"].to(dtype).double().reshape(-1, kw["hidden"].shape[-1])
    w = kw["weight"].to(dtype).double()

    def head_grads(g, round_logits_grad=False):
        if g is None:
            return None
        g_z = g["hidden"].reshape(-1, vocab)
        if round_logits_grad:
            g_z = g_z.to(dtype).double()
        out = {}
        if "hidden" not in frozen:
            out["hidden"] = (g_z @ w).reshape(kw["hidden"].shape)
        if "weight" not in frozen:
            out["weight"] = g_z.t() @ h
        if "bias" in g:  # the bias is added to z before the transform: its gradient is Σ_tokens G_z
            out["bias"] = g_z.sum(0) if round_logits_grad else g["bias"]
        return out

    ideal = HeadRun(run.out, run.metrics, head_grads(run.grads), head_grads(run.logps_grads), new)
    # The same with the logits gradient rounded to ``dtype`` before the two gradient GEMMs,
    # as autograd through half-precision logits (the naive path) or a half-precision
    # gradient tile (the Triton head) has it.
    ideal.grads_rounded = head_grads(run.grads, True)
    ideal.logps_grads_rounded = head_grads(run.logps_grads, True)
    return ideal


def head_logps_noise(naive_out, exact_out, ideal_out=None) -> float:
    """``δh``: how far rounding may move ``h = (π_w − ρ_w) − (π_l − ρ_l)`` on the naive path.

    With half-precision hidden states the GEMM itself rounds every logit (to bf16/fp16)
    on the naive and the fused path alike, so the sequence log-probs carry an error of
    ``ε`` = the naive path's own (the fused one is checked to be no worse than twice it).
    Then ``|δh| ≤ 2·(2ε_π + 2ε_ρ)``. In fp32/fp64 this is tiny and changes nothing.
    """
    outs = [naive_out] if ideal_out is None else [naive_out, ideal_out]
    eps_pi = max(max_abs_err(o.policy_logps, exact_out.policy_logps) for o in outs)
    eps_rho = max(max_abs_err(o.ref_logps, exact_out.ref_logps) for o in outs)
    finite = [e for e in (eps_pi, eps_rho) if e < float("inf")]
    return 2.0 * (2.0 * sum(finite))


def compare_head_outputs(
    fused_out, naive_out, exact_out, *, dtype, beta, loss_type, check_stats=True, ideal_out=None
) -> None:
    """``compare_outputs`` for ``linear_loss``: the log-probs under the plain no-worse criterion;
    the quantities derived from them (loss, rewards, stats) with an absolute floor that also
    covers the naive log-prob error propagated through the pair stage (``head_logps_noise``):
    a derived quantity may not be luckier than the log-probs it is computed from.

    ``ideal_out`` (half precision: ``rounded_gemm_reference``): every field may also be off
    by up to ``(1 + rtol)`` times the error that the GEMM's own rounding causes, which the
    naive path shares and which its extra roundings can cancel by luck.
    """
    atol, rtol = SLACK[dtype]
    scales = output_scales(exact_out, beta=beta, loss_type=loss_type)
    dh = head_logps_noise(naive_out, exact_out, ideal_out)
    pairs = exact_out.chosen_rewards.numel()
    if loss_type == "ipo":
        h = (exact_out.chosen_rewards - exact_out.rejected_rewards).double() / beta
        per_pair = 2.0 * _amax(h - 1.0 / (2.0 * beta)) * dh + dh * dh
    else:
        per_pair = beta * dh
    reduced = per_pair * (pairs if exact_out.loss.dim() == 0 else 1)  # "sum" adds B pair errors
    propagated = {
        "loss": reduced,
        "policy_logps": 0.0,
        "ref_logps": 0.0,
        "chosen_rewards": beta * dh / 2.0,
        "rejected_rewards": beta * dh / 2.0,
        "category_stats": pairs * max(per_pair, beta * dh),
    }
    for field in ("loss", "policy_logps", "ref_logps", "chosen_rewards", "rejected_rewards"):
        f, n, e = getattr(fused_out, field), getattr(naive_out, field), getattr(exact_out, field)
        n = n.detach().to(f.dtype)
        floor = max(atol * scales[field], propagated[field], _ideal_err(ideal_out, exact_out, field) * (1 + rtol))
        assert_no_worse_than_naive(f.detach(), n, e, atol=floor, rtol=rtol, name=field)
    if check_stats:
        f, n, e = fused_out.category_stats, naive_out.category_stats, exact_out.category_stats
        assert f.dtype == torch.float32, f"category_stats must be fp32, got {f.dtype}"
        assert f.shape == e.shape, f"category_stats shape {tuple(f.shape)} != {tuple(e.shape)}"
        ideal = _ideal_err(ideal_out, exact_out, "category_stats") * (1 + rtol)
        floor = max(2e-6 * scales["category_stats"], propagated["category_stats"], ideal)
        assert_no_worse_than_naive(f, n, e, atol=floor, rtol=rtol, name="category_stats")


def _ideal_err(ideal_out, exact_out, field: str) -> float:
    if ideal_out is None:
        return 0.0
    err = max_abs_err(getattr(ideal_out, field), getattr(exact_out, field))
    return err if err < float("inf") else 0.0


def head_grad_condition(naive_out, exact_out, *, dtype, beta, loss_type, ideal_out=None) -> float:
    """``loss_grad_condition`` with ``δh`` at least the propagated naive (and GEMM-rounding) log-prob error."""
    base = loss_grad_condition(exact_out, dtype=dtype, beta=beta, loss_type=loss_type)
    dh = head_logps_noise(naive_out, exact_out, ideal_out)
    if loss_type == "ipo":
        h = (exact_out.chosen_rewards - exact_out.rejected_rewards).double() / beta
        gap = float((h - 1.0 / (2.0 * beta)).abs().min()) if h.numel() else 1.0
        return max(base, dh / max(gap, 1e-12))
    return max(base, beta * dh)


def tiny_llama(tok, *, hidden_size: int = 32, seed: int = 0, **overrides):
    """A randomly initialised one-layer Llama sized for ``tok`` (CPU tests, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))
