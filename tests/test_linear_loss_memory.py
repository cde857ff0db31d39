"""Peak CPU memory of the fused LM head (``linear_loss``), forward + backward, above its inputs.

The fused head never builds the ``(2B, T, V)`` logits: it works in tiles bounded by
``memory_budget``. Its peak above the inputs, not counting the gradients it has to return
(``hidden`` and ``weight``), stays within the budget plus a small slack for per-token
buffers, does not grow with ``T``, and is a small fraction of the naive path's
(``backend="reference"``: all logits, their log-softmax and their gradient).
``pytest -s`` prints the measured peaks.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import catdpo_kernels
from catdpo_kernels.bench.memory import cpu_peak_above_start

MiB = 2**20
H, V, ROWS = 64, 4000, 8
BUDGET = 4 * MiB
SLACK = MiB // 2  # per-token buffers (layout, log-sum-exps, log-probs): O(N) bytes, ~100 per token
TOKENS = (128, 256, 512)


def inputs(tokens: int, *, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, tokens, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * (3.0 / H**0.5)).to(dtype).requires_grad_()
    ref_hidden = torch.randn(ROWS, tokens, H, generator=gen).to(dtype)
    labels = torch.randint(0, V, (ROWS, tokens), generator=gen)
    labels[:, : tokens // 4] = -100  # a prompt
    categories = torch.arange(ROWS // 2) % 4 - 1
    margins = torch.tensor([0.5, 1.0, 1.5])
    return hidden, weight, ref_hidden, labels, categories, margins


def measure(backend: str, tokens: int, reduction: str, *, budget=BUDGET):
    """``(peak bytes above the inputs minus the returned gradients, schedule, loss)``."""
    hidden, weight, ref_hidden, labels, categories, margins = inputs(tokens)
    seen = {}

    def step():
        out = catdpo_kernels.linear_loss(
            hidden,
            weight,
            labels,
            categories,
            margins,
            ref_hidden=ref_hidden,
            shift_labels=True,
            reduction=reduction,
            memory_budget=budget,
            backend=backend,
        )
        seen["schedule"] = type(out.policy_logps.grad_fn).__name__
        loss = out.loss if reduction != "none" else (out.loss * torch.linspace(0.5, 1.5, out.loss.numel())).sum()
        loss.backward()
        return loss.detach()

    peak, loss = cpu_peak_above_start(step)
    returned = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    return peak - returned, seen["schedule"], loss


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Memory does not depend on it, time does: on a busy machine with few cores the
    intra-op thread pool's spin-waits cost more than these small GEMMs gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def warm_up(one_intra_op_thread):
    """Lazy initialisation (autograd, the profiler, kernels) is not the loss's memory."""
    for backend in ("torch", "reference"):
        measure(backend, 16, "mean")
        measure(backend, 16, "none", budget=64 * V)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_peak_stays_within_the_budget_whatever_t(reduction):
    above, schedules = {}, {}
    for tokens in TOKENS:
        above[tokens], schedules[tokens], _ = measure("torch", tokens, reduction)
    print(
        f"\n[memory] linear_loss torch fp32 2B={ROWS} H={H} V={V} budget={BUDGET / MiB:.0f} MiB, "
        f"reduction={reduction}: " + ", ".join(f"T={t}: {above[t] / MiB:.2f} MiB ({schedules[t]})" for t in TOKENS)
    )
    # Default reduction: whole pairs fit the budget at T=128 (one pass), not beyond; "none": two passes.
    expected = {t: "TwoPassHeadBackward" for t in TOKENS}
    if reduction == "mean":
        expected[128] = "OnePassHeadBackward"
    assert schedules == expected
    for tokens in TOKENS:
        assert above[tokens] <= BUDGET + SLACK, f"T={tokens}: {above[tokens] / MiB:.2f} MiB above the inputs"
    # The measurement sees the tiles: a two-pass call uses most of its budget.
    assert above[512] >= BUDGET // 2
    # Up to four times the tokens on one schedule: only the O(N) per-token buffers grow.
    same = [t for t in TOKENS if schedules[t] == schedules[512]]
    assert len(same) >= 2 and above[512] - min(above[t] for t in same) <= SLACK, {t: above[t] / MiB for t in TOKENS}


def test_fused_peak_is_a_small_fraction_of_the_naive_path():
    fused, schedule, loss_fused = measure("torch", 512, "mean")
    naive, _, loss_naive = measure("reference", 512, "mean")
    torch.testing.assert_close(loss_fused, loss_naive, atol=1e-5, rtol=1e-5)
    logits_bytes = ROWS * 512 * V * 4
    print(
        f"\n[memory] T=512: fused {fused / MiB:.2f} MiB ({schedule}), naive {naive / MiB:.1f} MiB "
        f"(the logits alone are {logits_bytes / MiB:.1f} MiB), ratio {fused / naive:.4f}"
    )
    assert naive >= logits_bytes  # the naive path holds at least the fp32 (2B, T, V) logits
    assert fused <= 0.05 * naive


def triton_two_pass_peak(dtype, monkeypatch) -> tuple[int, int]:
    """``(peak above inputs and returned gradients, bytes of an fp32 (V, H))`` of a Triton two-pass call."""
    from catdpo_kernels.ops import linear_head_triton as lht

    monkeypatch.setattr(lht, "_MIN_CHUNK", 256)  # several vocabulary chunks at this small V
    vocab, width = 8192, 64
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, width, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * (3.0 / width**0.5)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, 4), generator=gen)

    def step():
        out = catdpo_kernels.linear_loss(
            hidden,
            weight,
            labels,
            ref_logps=torch.tensor([-30.0, -30.0]),
            loss_type="dpo",
            reduction="none",
            memory_budget=8 * 1024,  # one token row per tile: vocabulary chunks of 1024 columns
            backend="triton",
        )
        assert type(out.policy_logps.grad_fn).__name__ == "TwoPassHeadBackward"
        out.loss.sum().backward()

    step()
    hidden.grad = weight.grad = None
    peak, _ = cpu_peak_above_start(step)
    returned = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    above = peak - returned
    print(f"\n[memory] triton {dtype} two-pass, V={vocab} H={width}: {above / MiB:.2f} MiB above inputs and gradients")
    return above, vocab * width * 4


needs_interpreter = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="measures CPU memory under the Triton interpreter"),
]


@needs_interpreter[0]
@needs_interpreter[1]
def test_triton_two_pass_fp32_head_keeps_no_weight_sized_buffer(monkeypatch):
    """The control of the next test: with an fp32 head the weight gradient is the returned one."""
    above, full_fp32 = triton_two_pass_peak(torch.float32, monkeypatch)
    assert above < 3 * full_fp32 // 4


@needs_interpreter[0]
@needs_interpreter[1]
def test_triton_two_pass_keeps_one_fp32_weight_chunk_for_a_bf16_head(monkeypatch):
    above, full_fp32 = triton_two_pass_peak(torch.bfloat16, monkeypatch)
    assert above < 3 * full_fp32 // 4, f"{above / MiB:.2f} MiB: a full fp32 (V, H) buffer"
