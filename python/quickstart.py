"""Quick start: the Cat-DPO loss and the adaptive margins in a bare training loop.

Runs on CPU (backend "torch") or CUDA (backend "triton") with random data:
a tiny "lm_head" maps hidden states to logits, a ``CatDPOLoss`` computes the
loss per micro-batch (and sums the per-category statistics of the step), and
``update_margins()`` moves the per-category margins once per optimiser step.

    python python/quickstart.py [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

import catdpo_kernels as ck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    pairs, tokens, hidden, vocab, num_cats = 4, 32, 64, 1000, 5
    names = ["violence", "privacy", "drugs", "cybercrime", "self-harm"]
    lm_head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    ref_head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    ref_head.weight.copy_(lm_head.weight)
    opt = torch.optim.AdamW(lm_head.parameters(), lr=1e-2)
    # The criterion owns the margins (CategoryMargins options: init, lr, target, names, ...).
    criterion = ck.CatDPOLoss(
        num_cats, beta=0.1, loss_type="catdpo", shift_labels=True, init=0.5, lr=0.5, target=0.2, names=names
    ).to(device)
    margins = criterion.margins

    for step in range(args.steps):
        for _ in range(args.grad_accum):
            h = torch.randn(2 * pairs, tokens, hidden, device=device)
            labels = torch.randint(0, vocab, (2 * pairs, tokens), device=device)
            labels[:, :8] = -100  # prompt tokens are not scored
            categories = torch.randint(-1, num_cats, (pairs,), device=device)
            out = criterion(lm_head(h), labels, categories, ref_logits=ref_head(h))
            (out.loss / args.grad_accum).backward()
        # The (C+1, K) per-category table summed over this step's micro-batches.
        stats = ck.CategoryStats(criterion.pending_stats)
        opt.step()
        opt.zero_grad(set_to_none=True)
        criterion.update_margins()  # once per optimiser step; all-reduced when distributed
        worst = int(margins.value.argmax())
        reward_acc = stats.reward_acc.sum().item() / stats.count.sum().item()
        print(
            f"step {step:3d}  loss {out.loss.item():.4f}  reward acc {reward_acc:.2f}  "
            f"largest margin {names[worst]}={margins.value[worst].item():.3f}"
        )
    print("final margins:", {n: round(v, 3) for n, v in zip(names, margins.value.tolist())})


if __name__ == "__main__":
    main()
