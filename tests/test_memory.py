"""Peak CPU memory of forward+backward above the inputs (a memory assertion, not a timing).

At 2B=8, T=512, V=32000 fp32, ``backend="torch"`` must use at most 0.1x the naive
reference's peak (docs/design.md, "Performance model"), not counting the logits
gradient that backward has to return. ``pytest -s`` prints the measured ratio.
"""

from __future__ import annotations

import pytest
import torch

import catdpo_kernels
from catdpo_kernels.bench.memory import cpu_peak_above_start
from catdpo_kernels.ops import sequence_logps_torch as slt

MiB = 2**20


def inputs(rows, tokens, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(rows, tokens, vocab, generator=gen).mul_(3.0)
    ref = torch.randn(rows, tokens, vocab, generator=gen).mul_(3.0)
    labels = torch.randint(0, vocab, (rows, tokens), generator=gen)
    labels[:, : tokens // 4] = -100  # a prompt
    categories = torch.arange(rows // 2) % 4 - 1
    margins = torch.tensor([0.5, 1.0, 1.5])
    return policy, ref, labels, categories, margins


def measure(x, backend, **kwargs):
    def step():
        out = catdpo_kernels.loss(x, backend=backend, **kwargs)
        out.loss.backward()
        return out.loss.detach()

    step()  # warm-up: lazy inits and allocator caches are not the loss's memory
    x.grad = None
    peak, value = cpu_peak_above_start(step)
    x.grad = None
    return peak, value


@pytest.mark.slow
def test_torch_backend_peak_is_at_most_a_tenth_of_the_reference():
    policy, ref, labels, categories, margins = inputs(8, 512, 32000)
    x = policy.requires_grad_()
    kwargs = dict(labels=labels, categories=categories, margins=margins, ref_logits=ref, beta=0.1)
    grad_bytes = x.numel() * x.element_size()

    peak_torch, loss_torch = measure(x, "torch", **kwargs)
    peak_ref, loss_ref = measure(x, "reference", **kwargs)
    torch.testing.assert_close(loss_torch, loss_ref, atol=1e-5, rtol=1e-5)

    above_torch = peak_torch - grad_bytes
    above_ref = peak_ref - grad_bytes
    ratio = above_torch / above_ref
    print(
        f"\n[memory] 2B=8 T=512 V=32000 fp32 CPU, peak above inputs minus the {grad_bytes / MiB:.0f} MiB "
        f"logits gradient: torch {above_torch / MiB:.1f} MiB, reference {above_ref / MiB:.1f} MiB, "
        f"ratio {ratio:.4f}"
    )
    # The measurement itself sees the big allocations: the returned gradient in both
    # paths, and at least one full fp32 (2B, T, V) intermediate in the naive one.
    assert peak_torch >= grad_bytes
    assert above_ref >= grad_bytes
    assert ratio <= 0.1, f"torch backend peak {above_torch / MiB:.1f} MiB > 0.1 x reference {above_ref / MiB:.1f} MiB"


@pytest.mark.slow
def test_inplace_backward_allocates_no_logits_sized_buffer(monkeypatch):
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 1 << 16)
    rows, tokens, vocab, hidden = 8, 128, 4096, 16
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(rows, tokens, hidden, generator=gen).requires_grad_()
    w = torch.randn(hidden, vocab, generator=gen)
    _, ref, labels, categories, margins = inputs(rows, tokens, vocab, seed=2)
    kwargs = dict(labels=labels, categories=categories, margins=margins, ref_logits=ref, beta=0.1, backend="torch")
    logits_bytes = rows * tokens * vocab * 4

    def step(inplace):
        logits = h @ w  # an lm_head output: not a leaf
        grads = {}

        def run():
            out = catdpo_kernels.loss(logits, inplace_backward=inplace, **kwargs)
            out.loss.backward()
            grads["h"] = h.grad
            return out.loss.detach()

        peak, value = cpu_peak_above_start(run)
        h.grad = None
        return peak, value, grads["h"]

    step(True)  # warm-up
    peak_inplace, loss_inplace, grad_inplace = step(True)
    peak_normal, loss_normal, grad_normal = step(False)
    assert torch.equal(loss_inplace, loss_normal)
    torch.testing.assert_close(grad_inplace, grad_normal, atol=0, rtol=0)
    print(
        f"\n[memory] inplace_backward peak {peak_inplace / MiB:.2f} MiB vs {peak_normal / MiB:.2f} MiB without; "
        f"logits are {logits_bytes / MiB:.0f} MiB"
    )
    assert peak_normal >= logits_bytes  # the ordinary backward returns a fresh gradient
    assert peak_inplace < 0.1 * logits_bytes
