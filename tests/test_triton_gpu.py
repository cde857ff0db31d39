"""CUDA-only checks of backend="triton": no host syncs, and the production shape.

(The backend="triton" cases of test_correctness.py, test_triton_kernels.py and test_opcheck.py
also run on CUDA when a GPU is present.)
"""

import pytest
import torch
from _utils import make_batch

import catdpo_kernels
from catdpo_kernels.bench.memory import cuda_peak_above_start

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("reduction", ("mean", "category_mean"))
@pytest.mark.parametrize("multi_hot", (False, True))
def test_forward_and_backward_never_sync_with_the_host(reduction, multi_hot):
    batch = make_batch(4, 64, 1000, 5, torch.bfloat16, device="cuda", seed=1, multi_hot=multi_hot)
    logits = batch["policy_logits"].clone().requires_grad_()
    margins = catdpo_kernels.CategoryMargins(5).to("cuda")
    # Warm up: Triton compiles (and autotunes nothing) on the first call.
    catdpo_kernels.loss(**dict(batch, policy_logits=logits, margins=margins), check_inputs=False).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = catdpo_kernels.loss(
            **dict(batch, policy_logits=logits, margins=margins), reduction=reduction, check_inputs=False
        )
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)


def test_module_moves_its_margins_and_updates_without_syncing_forward():
    module = catdpo_kernels.CatDPOLoss(5, backend="triton", check_inputs=False).cuda()
    assert module.margins.value.device.type == "cuda"
    batch = make_batch(2, 16, 300, 5, torch.bfloat16, device="cuda", seed=2)
    batch.pop("margins")
    logits = batch.pop("policy_logits").clone().requires_grad_()
    module(logits, **batch).loss.backward()
    module.update_margins()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(logits, **batch).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _large_inputs(seed=0):
    rows, tokens, vocab, num_cats = 8, 2048, 128256, 19
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ref = torch.randn(rows, tokens, vocab, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, vocab, (rows, tokens), device="cuda", generator=gen)
    labels[:, :512] = -100  # a prompt
    categories = torch.tensor([0, 5, -1, 18], device="cuda")
    margins = torch.linspace(0.1, 2.0, num_cats, device="cuda")
    return (rows, tokens, vocab), ref, labels, categories, margins


def test_production_shape_values_and_memory():
    shape, ref, labels, categories, margins = _large_inputs()
    grad_bytes = ref.numel() * ref.element_size()  # the transient bf16 logits gradient

    hidden_dim = 64
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = (torch.randn(*shape[:2], hidden_dim, device="cuda", generator=gen) / 8).bfloat16()
    weight = torch.randn(hidden_dim, shape[2], device="cuda", generator=gen).bfloat16()

    def measured(backend, inplace=False):
        # Logits as an lm_head output: a non-leaf whose backward needs no (2B, T, V) buffer.
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w

        def step():
            out = catdpo_kernels.loss(
                logits,
                labels,
                categories,
                margins,
                ref_logits=ref,
                backend=backend,
                shift_labels=True,
                check_inputs=False,
                inplace_backward=inplace,
            )
            out.loss.backward()
            return out

        return cuda_peak_above_start(step)  # h, w and the logits are freed on return

    naive_peak, naive = measured("reference")
    fused_peak, fused = measured("triton")
    torch.testing.assert_close(fused.policy_logps, naive.policy_logps, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(fused.ref_logps, naive.ref_logps, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-4, atol=1e-4)
    # Peak above the inputs, not counting the logits gradient that backward must produce.
    ratio = (fused_peak - grad_bytes) / (naive_peak - grad_bytes)
    print(f"peak memory above inputs, fused/naive = {ratio:.4f}")
    assert ratio <= 0.02
    inplace_peak, _ = measured("triton", inplace=True)
    # In place: the gradient lands in the logits buffer; no (2B, T, V) allocation at all.
    assert inplace_peak < grad_bytes / 100
