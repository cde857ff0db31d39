"""Every fused backend against the float64 reference, one scenario at a time.

Each scenario runs on ``backend="torch"`` and on ``backend="triton"`` (without a GPU
the Triton kernels run on CPU tensors under the interpreter, see docs/design.md,
"Testing"). Criterion: the backend's error against float64 is no worse than the
naive path's error in the same dtype (``_utils.assert_backend_matches_reference``).

dtypes rotate over the cases of a scenario instead of multiplying them: the cheap
torch backend gets most (shape, option, dtype) combinations, the slow Triton
interpreter one dtype per case, rotating so that every dtype still comes up.
Backend-internal tests live in ``test_torch_chunking.py`` and ``test_triton_kernels.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _utils import (
    IGNORE_INDEX,
    assert_backend_matches_reference,
    assert_close_to_exact,
    float64_reference,
    make_batch,
    max_abs_err,
    run_loss,
)

import catdpo_kernels
from catdpo_kernels import LOSS_TYPES, REDUCTIONS
from catdpo_kernels.constants import STAT_COLUMNS
from catdpo_kernels.ops import sequence_logps_torch as slt

K = len(STAT_COLUMNS)  # columns of the category stats table

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
HALF_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = (*HALF_AND_FP32, torch.float64)
BACKENDS = ("torch", "triton")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def device_of(backend: str) -> str:
    """The torch backend runs on CPU tensors; Triton on the GPU, or on CPU under the interpreter."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


def batch_for(backend: str, *args, **kwargs) -> dict:
    return make_batch(*args, device=device_of(backend), **kwargs)


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def cases(torch_cases, triton_cases):
    """``pytest.param(backend, *case)`` for both backends; a case is a tuple (or one value)."""
    out = []
    for backend, items in (("torch", torch_cases), ("triton", triton_cases)):
        marks = [needs_triton] if backend == "triton" else []
        for item in items:
            item = item if isinstance(item, tuple) else (item,)
            out.append(pytest.param(backend, *item, marks=marks, id="-".join([backend, *map(_id, item)])))
    return out


def cross(values, dtypes):
    """Every value with every dtype."""
    return [(v, d) for v in values for d in dtypes]


def rotate(values, dtypes, start=0):
    """Each value with one dtype, the dtype advancing from case to case."""
    return [(v, dtypes[(start + i) % len(dtypes)]) for i, v in enumerate(values)]


def backend_param():
    return pytest.mark.parametrize(
        "backend", [pytest.param(b, marks=[needs_triton] if b == "triton" else []) for b in BACKENDS]
    )


def check(batch, backend, **opts):
    """``assert_backend_matches_reference`` with ``beta=0.1`` unless given."""
    return assert_backend_matches_reference(batch, backend=backend, **{"beta": 0.1, **opts})


@pytest.fixture
def several_blocks(monkeypatch):
    """Small blocks on both backends, so that their loops over the logits run several times:
    the torch backend's token blocks and the Triton kernels' vocab blocks."""
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 64)
    if HAS_TRITON:
        from catdpo_kernels.ops import triton_config

        monkeypatch.setattr(triton_config, "MAX_BLOCK_V", 16)


# ------------------------------------------------------------- shapes, dtypes
SHAPES = [(1, 1, 1), (1, 1, 7), (1, 4, 1), (2, 3, 5), (2, 3, 37), (3, 2, 130), (1, 9, 1000)]


@pytest.mark.parametrize("backend, shape, dtype", cases(cross(SHAPES, ALL_DTYPES), rotate(SHAPES, HALF_AND_FP32)))
def test_odd_shapes_and_dtypes(backend, shape, dtype):
    B, T, V = shape
    batch = batch_for(backend, B, T, V, 3, dtype, seed=B * 1000 + T * 10 + V)
    fused, grad, _, _ = check(batch, backend)
    assert fused.policy_logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fused.category_stats.shape == (4, K) and fused.category_stats[:, 0].sum() == B
    if V == 1:  # log_softmax of one logit is 0: no log-prob, no gradient
        assert torch.equal(fused.policy_logps, torch.zeros_like(fused.policy_logps))
        assert torch.equal(grad, torch.zeros_like(grad))


# Every loss type x every reduction; the dtype rotates so that each dtype meets every
# loss type and every reduction on the torch backend (the full cube would triple the
# runtime), and Triton is one dtype step ahead.
def _grid(start):
    out = []
    for i, loss_type in enumerate(LOSS_TYPES):
        for j, reduction in enumerate(REDUCTIONS):
            out.append((loss_type, reduction, HALF_AND_FP32[(i + j + start) % len(HALF_AND_FP32)]))
    return out


@pytest.mark.parametrize("backend, loss_type, reduction, dtype", cases(_grid(0), _grid(1)))
def test_every_loss_type_and_reduction(backend, loss_type, reduction, dtype):
    seed = LOSS_TYPES.index(loss_type) * 10 + REDUCTIONS.index(reduction)
    batch = batch_for(backend, 3, 1, 29, 3, dtype, seed=seed)
    margin = 0.7 if loss_type == "safedpo" else 0.0
    fused, _, _, _ = check(batch, backend, beta=0.3, loss_type=loss_type, reduction=reduction, margin=margin)
    assert fused.loss.shape == ((3,) if reduction == "none" else ())
    assert fused.category_stats.shape == (4, K)


SHIFT_AVG = ["plain", "shift", "avg", "shift+avg"]


@pytest.mark.parametrize(
    "backend, mode, dtype", cases(cross(SHIFT_AVG, HALF_AND_FP32), rotate(SHIFT_AVG, HALF_AND_FP32))
)
def test_shift_labels_and_average_log_prob(backend, mode, dtype):
    shift_labels, average_log_prob = "shift" in mode, "avg" in mode
    batch = batch_for(backend, 2, 4, 50, 2, dtype, seed=7, shift=shift_labels, masked_frac=0.4)
    _, grad, _, _ = check(batch, backend, shift_labels=shift_labels, average_log_prob=average_log_prob)
    if shift_labels:  # the last position is never scored
        assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))


@pytest.mark.parametrize(
    "backend, ignore_index, dtype",
    cases(cross([-1, 0, 5], HALF_AND_FP32[:2]), rotate([-1, 0, 5], HALF_AND_FP32)),
)
def test_custom_ignore_index(backend, ignore_index, dtype):
    # 0 and 5 are valid token ids: every such label is skipped, not scored.
    batch = batch_for(backend, 2, 4, 9, 2, dtype, seed=11, ignore_index=ignore_index, masked_frac=0.3)
    assert (batch["labels"] == ignore_index).any() and not (batch["labels"] == IGNORE_INDEX).any()
    _, grad, _, _ = check(batch, backend, ignore_index=ignore_index)
    masked = batch["labels"] == ignore_index
    assert torch.count_nonzero(grad[masked]) == 0


@pytest.mark.parametrize("backend, dtype", cases(HALF_AND_FP32, [torch.bfloat16]))
def test_ignored_tokens_get_exact_zero_gradient(backend, dtype):
    batch = batch_for(backend, 2, 5, 23, 2, dtype, seed=5, masked_frac=0.5)
    _, grad = run_loss(batch, backend=backend)
    masked = batch["labels"] == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(grad[masked]) == 0
    assert torch.count_nonzero(grad[~masked]) > 0


# ------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "backend, multi_hot, dtype",
    cases(cross([False, True], HALF_AND_FP32), rotate([False, True], HALF_AND_FP32, start=1)),
)
def test_precomputed_ref_logps(backend, multi_hot, dtype):
    batch = batch_for(backend, 3, 3, 33, 4, dtype, seed=5, multi_hot=multi_hot)
    ref = catdpo_kernels.loss(**batch, backend="reference").ref_logps
    with_logps = {**batch, "ref_logits": None, "ref_logps": ref}
    fused, _, _, _ = check(with_logps, backend, reduction="category_mean")
    assert torch.equal(fused.ref_logps, ref)
    with_logits, _ = run_loss(batch, backend=backend, reduction="category_mean", beta=0.1)
    # Only the reference log-probs differ: the backend's own (fp32) versus the naive ones.
    torch.testing.assert_close(fused.loss, with_logits.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backend, with_unsafe, dtype",
    cases(cross([False, True], HALF_AND_FP32), rotate([False, True], HALF_AND_FP32, start=2)),
)
def test_multi_hot_categories(backend, with_unsafe, dtype):
    batch = batch_for(backend, 4, 2, 40, 4, dtype, seed=13, multi_hot=True, with_unsafe=with_unsafe)
    if not with_unsafe:  # negative margins: a pair takes the largest of its own, not Δ_none = 0
        batch["margins"] = -batch["margins"]
    for reduction in ("mean", "category_mean"):
        fused, _, _, _ = check(batch, backend, reduction=reduction)
    assert fused.category_stats.shape == (5, K)
    multi = batch["categories"].sum(-1)
    expected_count = torch.cat([batch["categories"].sum(0), (multi == 0).sum(0, keepdim=True)]).float()
    assert torch.equal(fused.category_stats[:, 0], expected_count.to(fused.category_stats.device))
    assert fused.category_stats[:, 0].sum() > 4  # multi-hot pairs count in several rows


@pytest.mark.parametrize("backend, dtype", cases(HALF_AND_FP32, [torch.float16]))
def test_no_categories_plain_dpo(backend, dtype):
    batch = batch_for(backend, 3, 2, 20, 1, dtype, seed=17)
    batch = {**batch, "categories": None, "margins": None, "unsafe": None}
    for loss_type, margin in (("dpo", 0.0), ("ipo", 0.0), ("safedpo", 0.7)):
        fused, _, _, _ = check(batch, backend, loss_type=loss_type, margin=margin)
        assert fused.category_stats.shape == (1, K) and fused.category_stats[0, 0] == 3


@pytest.mark.parametrize(
    "backend, shift, dtype", cases(cross([False, True], ALL_DTYPES), rotate([False, True], HALF_AND_FP32, start=1))
)
def test_fully_masked_sequences_have_zero_logp_and_zero_gradient(backend, shift, dtype):
    batch = batch_for(backend, 3, 3, 23, 2, dtype, seed=19, fully_masked_rows=(1, 4), shift=shift)
    for avg in (False, True):
        fused, grad, _, _ = check(batch, backend, shift_labels=shift, average_log_prob=avg)
        assert fused.policy_logps[1].item() == 0.0 and fused.policy_logps[4].item() == 0.0
        assert fused.ref_logps[1].item() == 0.0 and fused.ref_logps[4].item() == 0.0
        assert torch.count_nonzero(grad[[1, 4]]) == 0
        assert grad[0].abs().sum() > 0


# ------------------------------------------------------------- strides
@pytest.mark.parametrize("backend, dtype", cases(HALF_AND_FP32, [torch.bfloat16]))
def test_non_contiguous_logits_wider_vocab_buffer(backend, dtype):
    batch = batch_for(backend, 2, 5, 31, 3, dtype, seed=23, non_contiguous=True)
    assert not batch["policy_logits"].is_contiguous() and batch["policy_logits"].stride(-1) == 1
    _, grad, _, _ = check(batch, backend, shift_labels=True)
    contiguous = {**batch, "policy_logits": batch["policy_logits"].contiguous()}
    contiguous["ref_logits"] = batch["ref_logits"].contiguous()
    _, grad_c = run_loss(contiguous, backend=backend, shift_labels=True, beta=0.1)
    assert torch.equal(grad, grad_c)


@pytest.mark.parametrize("backend, dtype", cases(HALF_AND_FP32, [torch.float32]))
def test_non_contiguous_logits_row_slice(backend, dtype):
    wide = batch_for(backend, 4, 3, 29, 3, dtype, seed=29)
    batch = batch_for(backend, 2, 3, 29, 3, dtype, seed=31)
    batch["policy_logits"] = wide["policy_logits"][::2]
    batch["ref_logits"] = wide["ref_logits"][1::2]
    assert not batch["policy_logits"].is_contiguous()
    check(batch, backend)
    check(batch, backend, shift_labels=True, average_log_prob=True)


@backend_param()
def test_row_and_token_strided_logits_and_int32_labels(backend):
    batch = batch_for(backend, 4, 3, 19, 2, torch.float32, seed=17)
    wide = torch.randn(16, 6, 19, dtype=torch.float64).float().to(device_of(backend))
    wide[::2, :3] = batch["policy_logits"]
    batch["policy_logits"] = wide[::2, :3]  # strided rows and tokens, contiguous vocab
    batch["labels"] = batch["labels"].to(torch.int32)
    assert batch["policy_logits"].stride() == (6 * 19 * 2, 19, 1)
    check(batch, backend)


@backend_param()
def test_strided_categories_unsafe_and_margins(backend):
    batch = batch_for(backend, 3, 2, 19, 4, torch.float32, seed=71)

    def spread(t):  # the same values with stride 2
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]

    strided = dict(batch, categories=spread(batch["categories"]), unsafe=spread(batch["unsafe"].float()))
    strided["margins"] = spread(batch["margins"])
    assert strided["categories"].stride() == (2,) and strided["margins"].stride() == (2,)
    assert strided["unsafe"].stride() == (2,)
    fused, _, _, _ = check(strided, backend)
    plain, _ = run_loss(batch, backend=backend, beta=0.1)
    assert torch.equal(fused.loss, plain.loss)
    multi = batch_for(backend, 3, 2, 19, 4, torch.float32, seed=72, multi_hot=True)
    multi["categories"] = multi["categories"].t().contiguous().t()  # column-major multi-hot
    assert multi["categories"].stride(1) != 1
    check(multi, backend, reduction="category_mean")


# ------------------------------------------------------------- inplace backward
@pytest.mark.parametrize(
    "backend, shift_labels, dtype",
    cases(cross([False, True], HALF_AND_FP32), rotate([False, True], HALF_AND_FP32, start=2)),
)
def test_inplace_backward_writes_the_same_gradient_into_the_logits(backend, shift_labels, dtype, several_blocks):
    batch = batch_for(backend, 2, 4, 41, 3, dtype, seed=37, shift=shift_labels)
    opts = dict(shift_labels=shift_labels, reduction="none", beta=0.1)
    _, normal = run_loss(batch, backend=backend, **opts)

    base = batch["policy_logits"].clone().requires_grad_()
    logits = base * 1.0  # a non-leaf buffer, like an lm_head output
    out = catdpo_kernels.loss(**{**batch, "policy_logits": logits}, backend=backend, inplace_backward=True, **opts)
    out.loss.backward(torch.linspace(0.5, 1.5, 2, dtype=torch.float64).to(out.loss))
    assert torch.equal(base.grad, normal)
    assert torch.equal(logits.detach(), normal)  # the buffer now holds the gradient


@backend_param()
def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend):
    batch = batch_for(backend, 1, 3, 8, 2, seed=41)
    leaf = batch["policy_logits"].requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        catdpo_kernels.loss(**batch, backend=backend, inplace_backward=True)
    assert leaf.grad is None


# ------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend, dtype", cases(HALF_AND_FP32[:2], [torch.bfloat16]))
def test_repeated_runs_are_bitwise_identical(backend, dtype, several_blocks):
    batch = batch_for(backend, 2, 4, 37, 4, dtype, seed=43, multi_hot=True)
    first, g_first = run_loss(batch, backend=backend, reduction="category_mean", beta=0.1)
    again, g_again = run_loss(batch, backend=backend, reduction="category_mean", beta=0.1)
    for field in first._fields:
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert torch.equal(g_first, g_again)


# ------------------------------------------------------------- checks off
def _opts(loss_type, **extra):
    return dict(loss_type=loss_type, beta=0.1, margin=0.5 if loss_type == "safedpo" else 0.0, **extra)


@backend_param()
def test_checks_off_out_of_range_labels_give_nan(backend):
    batch = batch_for(backend, 3, 4, 40, 3, seed=59)
    batch["labels"][1, 2] = 40  # == V: pair 1, chosen row
    batch["labels"][5, 0] = -5  # pair 2, rejected row
    with pytest.raises(ValueError, match="labels"):
        catdpo_kernels.loss(**batch, backend=backend)
    out, grad = run_loss(batch, backend=backend, check_inputs=False, reduction="none", beta=0.1)
    assert torch.isnan(out.policy_logps[[1, 5]]).all() and torch.isfinite(out.policy_logps[[0, 2, 3, 4]]).all()
    assert torch.isnan(out.loss[[1, 2]]).all() and torch.isfinite(out.loss[0])
    assert torch.isfinite(grad[[0, 3]]).all()  # the rows of the clean pair
    exact, _ = float64_reference(**batch, check_inputs=False, reduction="none", beta=0.1)
    assert_close_to_exact(out.loss, exact.loss, atol=1e-5, rtol=1e-5, name="loss with NaN pairs")
    mean, _ = run_loss(batch, backend=backend, check_inputs=False, grad=False, beta=0.1)
    assert torch.isnan(mean.loss)


@backend_param()
def test_checks_off_out_of_range_categories_give_nan(backend):
    batch = batch_for(backend, 4, 2, 8, 3, seed=61)
    batch["categories"] = torch.tensor([0, 3, -1, -2], device=device_of(backend))  # C = 3: pairs 1 and 3 invalid
    with pytest.raises(ValueError, match="categories"):
        catdpo_kernels.loss(**batch, backend=backend)
    for loss_type in LOSS_TYPES:
        opts = _opts(loss_type, check_inputs=False)
        out, _ = run_loss(batch, backend=backend, reduction="none", grad=False, **opts)
        assert torch.isnan(out.loss[[1, 3]]).all() and torch.isfinite(out.loss[[0, 2]]).all(), loss_type
        assert out.category_stats[:, 0].tolist() == [1, 0, 0, 1], loss_type  # invalid pairs count in no row
        exact, _ = float64_reference(**batch, reduction="none", grad=False, **opts)
        assert_close_to_exact(out.loss, exact.loss, atol=1e-5, rtol=1e-5, name=f"{loss_type} loss")
    # dpo reads no margin, but category_mean groups by category all the same.
    reduced, _ = run_loss(batch, backend=backend, reduction="category_mean", **_opts("dpo", check_inputs=False))
    assert torch.isnan(reduced.loss)
    mean, _ = run_loss(batch, backend=backend, grad=False, **_opts("catdpo", check_inputs=False))
    assert torch.isnan(mean.loss)


# (chosen flag, rejected flag) of pairs 1..5; pair 0 is valid (0, 1).
BAD_FLAGS = [(2.0, 1.0), (0.0, -1.0), (0.0, 0.5), (float("nan"), 1.0), (1.0, 0.0)]  # the last: s = h_l - h_w = -1


@backend_param()
def test_checks_off_invalid_unsafe_flags_give_nan(backend):
    B = 1 + len(BAD_FLAGS)
    batch = batch_for(backend, B, 1, 8, 3, seed=67)
    batch["categories"] = torch.tensor([1, 0, 2, -1, 1, 0], device=device_of(backend))
    chosen, rejected = zip((0.0, 1.0), *BAD_FLAGS)
    batch["unsafe"] = torch.tensor(chosen + rejected, dtype=torch.float64, device=device_of(backend))
    for i, (h_w, h_l) in enumerate(BAD_FLAGS, start=1):  # each flaw alone is refused with checks on
        flags = torch.zeros(2 * B, dtype=torch.float64, device=device_of(backend))
        flags[i], flags[B + i] = h_w, h_l
        match = "unsafe marks chosen row" if (h_w, h_l) == (1.0, 0.0) else "unsafe must hold 0/1"
        with pytest.raises(ValueError, match=match):
            catdpo_kernels.loss(**dict(batch, unsafe=flags), backend=backend)
    for loss_type in LOSS_TYPES:
        opts = _opts(loss_type, check_inputs=False)
        out, grad = run_loss(batch, backend=backend, reduction="none", **opts)
        assert torch.isfinite(out.loss[0]) and torch.isnan(out.loss[1:]).all(), loss_type
        assert torch.isfinite(out.policy_logps).all()
        assert torch.isfinite(grad[[0, B]]).all(), loss_type
        assert out.category_stats[:, 0].sum() == B  # the pairs still count in their rows
        exact, _ = float64_reference(**batch, reduction="none", **opts)
        assert_close_to_exact(out.loss, exact.loss, atol=1e-5, rtol=1e-5, name=f"{loss_type} loss")


# ------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "backend, offset, dtype",
    cases(cross([0.0, 60.0], [torch.float32, torch.float64]), cross([0.0, 60.0], [torch.float32])),
)
def test_large_logits_keep_the_naive_accuracy(backend, offset, dtype):
    """LLM-sized logits (spread ~20, |max| up to ~100): one rounded fp32 ``max + log-sum``
    would cost up to half an ulp of |max| in every token log-prob and softmax entry, and
    the target entry g·(1 − p) of the gradient would carry it tenfold versus log_softmax."""
    batch = batch_for(backend, 2, 5, 129, 3, dtype, seed=67, scale=20.0)
    for key in ("policy_logits", "ref_logits"):
        batch[key] = batch[key] + offset
    check(batch, backend, beta=1.0)
    check(batch, backend, beta=1.0, shift_labels=True, average_log_prob=True, reduction="none")


@backend_param()
def test_minus_inf_logits_are_handled(backend, several_blocks):
    batch = batch_for(backend, 2, 3, 20, 2, torch.float32, seed=41)
    logits = batch["policy_logits"].clone()
    logits[..., :16] = float("-inf")  # with several_blocks: a whole first vocab block of -inf
    labels = batch["labels"].clone()
    labels[labels != IGNORE_INDEX] = 17
    batch = dict(batch, policy_logits=logits, labels=labels)
    fused, grad = run_loss(batch, backend=backend)
    exact, exact_grad = float64_reference(**batch)
    assert torch.isfinite(fused.loss) and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[..., :16]) == 0
    assert max_abs_err(fused.policy_logps, exact.policy_logps) < 1e-4
    assert max_abs_err(grad, exact_grad) < 1e-6


@backend_param()
def test_autocast_gives_the_same_result(backend):
    batch = batch_for(backend, 2, 4, 19, 3, seed=53)
    plain, g_plain = run_loss(batch, backend=backend, beta=0.1)
    with torch.autocast(device_of(backend), dtype=torch.bfloat16):
        auto, g_auto = run_loss(batch, backend=backend, beta=0.1)
    for field in plain._fields:
        assert getattr(auto, field).dtype == getattr(plain, field).dtype, field
        assert torch.equal(getattr(auto, field), getattr(plain, field)), field
    assert torch.equal(g_auto, g_plain)


@backend_param()
def test_float64_logits(backend):
    batch = batch_for(backend, 2, 3, 11, 2, torch.float64, seed=53)
    if backend == "triton":  # the kernels take fp32/bf16/fp16 only
        with pytest.raises(TypeError, match="policy_logits.*float64"):
            catdpo_kernels.loss(**batch, backend=backend)
        with pytest.raises(TypeError, match="ref_logits.*float64"):
            catdpo_kernels.loss(**dict(batch, policy_logits=batch["policy_logits"].float()), backend=backend)
        return
    fused, grad, _, _ = check(batch, backend)
    assert fused.policy_logps.dtype == fused.loss.dtype == grad.dtype == torch.float64


@needs_triton
@pytest.mark.parametrize("multi_hot", [False, True])
def test_triton_agrees_with_torch(multi_hot):
    batch = make_batch(3, 5, 43, 3, torch.bfloat16, device=device_of("triton"), seed=29, multi_hot=multi_hot)
    t_out, t_grad = run_loss(batch, backend="torch", reduction="category_mean")
    k_out, k_grad = run_loss(batch, backend="triton", reduction="category_mean")
    for field in t_out._fields:
        assert max_abs_err(getattr(k_out, field), getattr(t_out, field)) < 1e-4, field
    assert torch.equal(k_out.category_stats[:, 0], t_out.category_stats[:, 0])
    assert max_abs_err(k_grad.float(), t_grad.float()) < 1e-2
