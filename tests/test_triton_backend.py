"""backend="triton" against the float64 reference, the naive path and the torch backend.

On machines without a GPU these run the real Triton kernels under
TRITON_INTERPRET=1 (set in conftest.py) on small shapes.
"""

import pytest
import torch
from _utils import assert_backend_matches_reference, float64_reference, make_batch, max_abs_err, run_loss

import catdpo_kernels
from catdpo_kernels.constants import LOSS_TYPES, REDUCTIONS
from catdpo_kernels.ops import triton_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_against_reference(batch, dtype, **opts):
    fused, grad, _, _ = assert_backend_matches_reference(batch, backend="triton", **opts)
    return fused, grad


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """Force several vocab blocks per token so the online log-sum-exp loop is exercised."""
    monkeypatch.setattr(triton_config, "MAX_BLOCK_V", 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V", [(2, 5, 37), (1, 1, 7), (3, 4, 100)])
def test_matches_reference_over_shapes_and_dtypes(dtype, B, T, V, small_vocab_blocks):
    batch = make_batch(B, T, V, 3, dtype, device=DEVICE, seed=B * 100 + T * 10 + V)
    _check_against_reference(batch, dtype, beta=0.1, loss_type="catdpo")


@pytest.mark.parametrize("offset", [0.0, 60.0])
def test_large_logits_keep_the_naive_accuracy(offset, small_vocab_blocks):
    # |logits| up to ~100: max and log-sum are kept apart, as log_softmax does.
    batch = make_batch(3, 5, 129, 3, torch.float32, device=DEVICE, seed=67, scale=20.0)
    for key in ("policy_logits", "ref_logits"):
        batch[key] = batch[key] + offset
    _check_against_reference(batch, torch.float32, beta=1.0)
    _check_against_reference(batch, torch.float32, beta=1.0, shift_labels=True, average_log_prob=True, reduction="none")


def test_vocab_smaller_than_one_block():
    # V = 5 inside a 8-wide block: the padded lanes must not leak into the LSE.
    batch = make_batch(2, 3, 5, 2, torch.float32, device=DEVICE, seed=3)
    _check_against_reference(batch, torch.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_loss_type_and_reduction(loss_type, reduction):
    batch = make_batch(3, 4, 29, 3, torch.float32, device=DEVICE, seed=7)
    _check_against_reference(batch, torch.float32, beta=0.3, loss_type=loss_type, reduction=reduction, margin=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_labels_and_fully_masked_rows(dtype, small_vocab_blocks):
    batch = make_batch(2, 6, 41, 3, dtype, device=DEVICE, seed=11, shift=True, fully_masked_rows=(1, 2))
    out, grad = _check_against_reference(batch, dtype, shift_labels=True, average_log_prob=True)
    # Fully masked sequences: log-prob exactly 0 and an all-zero gradient row.
    assert out.policy_logps[1].item() == 0.0 and out.policy_logps[2].item() == 0.0
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[2]) == 0
    # shift_labels drops the last position: its gradient is exactly zero.
    assert torch.count_nonzero(grad[:, -1]) == 0


def test_ignored_tokens_get_exact_zero_gradient():
    batch = make_batch(2, 5, 23, 2, torch.bfloat16, device=DEVICE, seed=5, masked_frac=0.5)
    _, grad = run_loss(batch, backend="triton")
    masked = batch["labels"] == -100
    assert masked.any()
    assert torch.count_nonzero(grad[masked]) == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_non_contiguous_logits(dtype, small_vocab_blocks):
    batch = make_batch(2, 4, 37, 3, dtype, device=DEVICE, seed=13, non_contiguous=True)
    assert not batch["policy_logits"].is_contiguous()
    _check_against_reference(batch, dtype)


def test_row_sliced_logits_and_int32_labels():
    batch = make_batch(4, 3, 19, 2, torch.float32, device=DEVICE, seed=17)
    wide = torch.randn(16, 6, 19, device=DEVICE, dtype=torch.float64).float()
    wide[::2, :3] = batch["policy_logits"]
    batch["policy_logits"] = wide[::2, :3]  # strided rows and tokens, contiguous vocab
    batch["labels"] = batch["labels"].to(torch.int32)
    _check_against_reference(batch, torch.float32)


@pytest.mark.parametrize("multi_hot", (False, True))
def test_precomputed_ref_logps_and_multi_hot(multi_hot):
    batch = make_batch(3, 4, 31, 4, torch.float32, device=DEVICE, seed=19, multi_hot=multi_hot)
    ref = catdpo_kernels.loss(**batch, backend="reference").ref_logps
    batch = dict(batch, ref_logits=None, ref_logps=ref)
    _check_against_reference(batch, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_writes_gradient_into_logits(dtype):
    batch = make_batch(2, 4, 29, 3, dtype, device=DEVICE, seed=23, shift=True)
    opts = dict(shift_labels=True)
    _, expected = run_loss(batch, backend="triton", **opts)
    leaf = batch["policy_logits"].clone().requires_grad_()
    logits = leaf * 1  # an intermediate, like an lm_head output
    out = catdpo_kernels.loss(**dict(batch, policy_logits=logits), backend="triton", inplace_backward=True, **opts)
    out.loss.backward()
    assert torch.equal(leaf.grad, expected)
    # The gradient now lives in the logits buffer itself: no new (2B, T, V) tensor.
    assert torch.equal(logits.detach(), expected)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_nan_upstream_gradient_stays_nan_in_half_types(dtype):
    # GPUs produce NaN as 0x7FFFFFFF; a rounding bias added to those bits would wrap
    # it to -0.0 and hide a diverged step from the grad scaler.
    batch = make_batch(2, 4, 23, 2, dtype, device=DEVICE, seed=61, masked_frac=0.4)
    logits = batch["policy_logits"].clone().requires_grad_()
    out = catdpo_kernels.loss(**dict(batch, policy_logits=logits), backend="triton")
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32).to(DEVICE)
    out.policy_logps.backward(nan.expand(out.policy_logps.shape).clone())
    counted = batch["labels"] != -100
    assert torch.isnan(logits.grad[counted]).all()
    assert torch.count_nonzero(logits.grad[~counted]) == 0


def test_strided_categories_unsafe_and_margins():
    batch = make_batch(3, 4, 19, 4, torch.float32, device=DEVICE, seed=71)
    spread = lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # noqa: E731 - same values, stride 2
    strided = dict(batch, categories=spread(batch["categories"]), unsafe=spread(batch["unsafe"]).float(),
                   margins=spread(batch["margins"]))  # fmt: skip
    assert strided["categories"].stride() == (2,) and strided["margins"].stride() == (2,)
    _check_against_reference(strided, torch.float32)
    multi = make_batch(3, 4, 19, 4, torch.float32, device=DEVICE, seed=72, multi_hot=True)
    multi["categories"] = multi["categories"].t().contiguous().t()  # column-major multi-hot
    assert multi["categories"].stride(1) != 1
    _check_against_reference(multi, torch.float32)


def test_agrees_with_torch_backend():
    batch = make_batch(3, 5, 43, 3, torch.bfloat16, device=DEVICE, seed=29)
    t_out, t_grad = run_loss(batch, backend="torch", reduction="category_mean")
    k_out, k_grad = run_loss(batch, backend="triton", reduction="category_mean")
    for field in t_out._fields:
        assert max_abs_err(getattr(k_out, field), getattr(t_out, field)) < 1e-4, field
    assert max_abs_err(k_grad.float(), t_grad.float()) < 1e-2


def test_repeated_runs_are_bitwise_identical(small_vocab_blocks):
    batch = make_batch(2, 5, 37, 3, torch.bfloat16, device=DEVICE, seed=31)
    first, g1 = run_loss(batch, backend="triton", reduction="category_mean")
    second, g2 = run_loss(batch, backend="triton", reduction="category_mean")
    for field in first._fields:
        assert torch.equal(getattr(first, field), getattr(second, field)), field
    assert torch.equal(g1, g2)


def test_unchecked_out_of_range_values_give_nan_not_a_crash():
    batch = make_batch(2, 4, 17, 3, torch.float32, device=DEVICE, seed=37)
    labels = batch["labels"].clone()
    labels[0, -1] = 17  # == V: out of range
    out, _ = run_loss(dict(batch, labels=labels), backend="triton", check_inputs=False, reduction="none")
    assert torch.isnan(out.policy_logps[0]) and torch.isnan(out.loss[0])
    assert torch.isfinite(out.loss[1])
    cats = torch.tensor([5, 0], device=DEVICE)  # C = 3
    for loss_type in ("catdpo", "dpo", "ipo", "safedpo"):
        for backend in ("triton", "torch", "reference"):
            out, _ = run_loss(
                dict(batch, categories=cats), backend=backend, check_inputs=False, reduction="none", loss_type=loss_type
            )
            assert torch.isnan(out.loss[0]) and torch.isfinite(out.loss[1]), (loss_type, backend)


def test_minus_inf_logits_are_handled():
    batch = make_batch(2, 3, 20, 2, torch.float32, device=DEVICE, seed=41)
    logits = batch["policy_logits"].clone()
    logits[..., :16] = float("-inf")  # a whole first vocab block of -inf
    labels = batch["labels"].clone()
    labels[labels != -100] = 17
    batch = dict(batch, policy_logits=logits, labels=labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_config, "MAX_BLOCK_V", 16)
        fused, grad = run_loss(batch, backend="triton")
    exact, exact_grad = float64_reference(**batch)
    assert torch.isfinite(fused.loss)
    assert max_abs_err(fused.policy_logps, exact.policy_logps) < 1e-4
    assert max_abs_err(grad, exact_grad) < 1e-6


def test_autocast_matches_plain_call():
    batch = make_batch(2, 3, 19, 2, torch.float32, device=DEVICE, seed=43)
    plain, g_plain = run_loss(batch, backend="triton")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        cast, g_cast = run_loss(batch, backend="triton")
    assert torch.equal(plain.loss, cast.loss)
    assert torch.equal(g_plain, g_cast)


def test_torch_compile_does_not_break_the_graph():
    batch = make_batch(2, 3, 19, 2, torch.float32, device=DEVICE, seed=47)
    hidden = torch.randn(4, 3, 8, device=DEVICE)
    weight = torch.randn(8, 19, device=DEVICE, requires_grad=True)

    def step(hidden, weight, check_inputs):
        logits = hidden @ weight
        out = catdpo_kernels.loss(
            logits, batch["labels"], batch["categories"], batch["margins"],
            ref_logits=batch["ref_logits"], backend="triton", check_inputs=check_inputs,
        )  # fmt: skip
        return out.loss

    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(hidden, weight, False).graph_break_count == 0
    # With check_inputs=True the value checks need one host sync, and every break
    # dynamo reports is that one sync (it counts it once per enclosing frame)...
    checked = torch._dynamo.explain(step)(hidden, weight, True)
    assert checked.graph_break_count >= 1
    assert all(r.user_stack[-1].name == "check_values" for r in checked.break_reasons)
    # ...which is exactly one break when dynamo resumes nested frames in place.
    if hasattr(torch._dynamo.config, "nested_graph_breaks"):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(nested_graph_breaks=True):
            assert torch._dynamo.explain(step)(hidden, weight, True).graph_break_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, False)
    loss.backward()
    g_compiled, weight.grad = weight.grad.clone(), None
    eager = step(hidden, weight, False)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(g_compiled, weight.grad)


def test_fp64_logits_are_rejected_with_a_clear_error():
    batch = make_batch(1, 2, 5, 1, torch.float64, device=DEVICE, seed=53)
    with pytest.raises(TypeError, match="policy_logits"):
        catdpo_kernels.loss(**batch, backend="triton")
