"""``backend="triton"`` internals: the multi-block vocab loop, half-type rounding of the
gradient and ``torch.compile``.

On machines without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set in
conftest.py) on CPU tensors, so shapes stay tiny. The scenarios every backend
shares are in ``test_correctness.py``.
"""

import pytest
import torch
from _utils import IGNORE_INDEX, assert_backend_matches_reference, make_batch

pytest.importorskip("triton")

import catdpo_kernels  # noqa: E402
from catdpo_kernels.ops import triton_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """Several vocab blocks per token, so the online log-sum-exp loop runs more than once."""
    monkeypatch.setattr(triton_config, "MAX_BLOCK_V", 16)


def test_max_block_v_caps_the_block():
    assert triton_config.vocab_loop_config(100, torch.float32).BLOCK_V == 128
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_config, "MAX_BLOCK_V", 16)
        assert triton_config.vocab_loop_config(100, torch.float32).BLOCK_V == 16


# (B, T, V, dtype): V = 37 and 100 span 3 and 7 blocks of 16, the last one partial.
MULTI_BLOCK = [(2, 5, 37, torch.float32), (2, 3, 100, torch.bfloat16)]


@pytest.mark.parametrize("B, T, V, dtype", MULTI_BLOCK, ids=lambda v: str(v).replace("torch.", ""))
def test_multi_block_vocab_loop_matches_reference(B, T, V, dtype, small_vocab_blocks):
    batch = make_batch(B, T, V, 3, dtype, device=DEVICE, seed=B * 100 + T * 10 + V)
    assert_backend_matches_reference(batch, backend="triton", beta=0.1)


def test_multi_block_with_shift_labels_and_fully_masked_rows(small_vocab_blocks):
    batch = make_batch(2, 4, 41, 3, torch.float16, device=DEVICE, seed=11, shift=True, fully_masked_rows=(1, 2))
    out, grad, _, _ = assert_backend_matches_reference(
        batch, backend="triton", beta=0.1, shift_labels=True, average_log_prob=True
    )
    assert out.policy_logps[1].item() == 0.0 and out.policy_logps[2].item() == 0.0
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[2]) == 0
    assert torch.count_nonzero(grad[:, -1]) == 0


def test_multi_block_large_logits_keep_the_naive_accuracy(small_vocab_blocks):
    # |logits| up to ~100 over 9 blocks: max and log-sum are carried apart across blocks.
    batch = make_batch(2, 3, 129, 3, torch.float32, device=DEVICE, seed=67, scale=20.0)
    for key in ("policy_logits", "ref_logits"):
        batch[key] = batch[key] + 60.0
    assert_backend_matches_reference(batch, backend="triton", beta=1.0, reduction="none")


def test_multi_block_non_contiguous_logits(small_vocab_blocks):
    batch = make_batch(2, 4, 37, 3, torch.bfloat16, device=DEVICE, seed=13, non_contiguous=True)
    assert not batch["policy_logits"].is_contiguous()
    assert_backend_matches_reference(batch, backend="triton", beta=0.1)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_nan_upstream_gradient_stays_nan_in_half_types(dtype):
    # GPUs produce NaN as 0x7FFFFFFF; a rounding bias added to those bits would wrap
    # it to -0.0 and hide a diverged step from the grad scaler.
    batch = make_batch(2, 4, 23, 2, dtype, device=DEVICE, seed=61, masked_frac=0.4)
    logits = batch["policy_logits"].clone().requires_grad_()
    out = catdpo_kernels.loss(**dict(batch, policy_logits=logits), backend="triton")
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32).to(DEVICE)
    out.policy_logps.backward(nan.expand(out.policy_logps.shape).clone())
    counted = batch["labels"] != IGNORE_INDEX
    assert torch.isnan(logits.grad[counted]).all()
    assert torch.count_nonzero(logits.grad[~counted]) == 0


def test_torch_compile_does_not_break_the_graph():
    batch = make_batch(2, 3, 19, 2, torch.float32, device=DEVICE, seed=47)
    hidden = torch.randn(4, 3, 8, device=DEVICE)
    weight = torch.randn(8, 19, device=DEVICE, requires_grad=True)

    def step(hidden, weight, check_inputs):
        logits = hidden @ weight
        out = catdpo_kernels.loss(
            logits,
            batch["labels"],
            batch["categories"],
            batch["margins"],
            ref_logits=batch["ref_logits"],
            unsafe=batch["unsafe"],
            backend="triton",
            check_inputs=check_inputs,
        )
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
