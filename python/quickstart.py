"""Quick start: the Cat-DPO loss on the fused LM head, with the adaptive per-category margins, in a bare loop.

A toy policy: fixed "last hidden states" (what a transformer would hand to its LM
head) and a trainable ``lm_head``; the reference is a frozen copy of the head.
``CatDPOLinearLoss`` computes the loss from the hidden states and the head's
weight, one tile of counted tokens at a time, never building the ``(2B, T, V)``
logits; it sums the per-category statistics of the step, and ``update_margins()``
moves each category's margin once per optimiser step.

Five harm categories. Four can be learned. In ``self-harm`` the labels are noisy:
every response is the chosen one in one pair and the rejected one in another, so
no policy can prefer the safe side there. Watch its margin climb to the cap
while the other margins climb, then fall once their categories are learned.

    python python/quickstart.py [--steps 80] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

import catdpo_kernels as ck

NAMES = ["violence", "privacy", "drugs", "cybercrime", "self-harm"]
NOISY = NAMES.index("self-harm")
PAIRS_PER_CATEGORY, PROMPT, RESPONSE, HIDDEN, VOCAB = 8, 6, 10, 32, 64

EXPLANATION = """\
How to read this:
  * The loss is softplus(-z) with z = beta*h - s*margin: h is how much more the policy prefers
    the safe (chosen) response than the reference does, and the margin is the bar it must clear.
  * At step 0 the policy is the reference: h = 0, and every category's unsafe rate sigma(-beta*h)
    is 0.5, above the target 0.2. So every margin grows, and for the first steps the loss RISES
    while beta*h grows too: the bar is raised faster than the policy clears it. Nothing is broken.
  * Once beta*h outgrows the margin in a category, its unsafe rate falls below the target, its
    margin shrinks (to 0 here) and its loss falls towards 0.
  * In a category the policy cannot get right (self-harm: noisy labels) the rate stays near 0.5,
    the margin climbs to its cap (max_margin) and stays there, and so does that category's loss:
    Cat-DPO keeps the pressure where the model still fails."""


def make_data(device: torch.device, generator: torch.Generator):
    """Fixed pairs: ``hidden`` (N, 2, T, H) for (chosen, rejected), ``labels`` (N, 2, T), ``category`` (N,)."""
    n = PAIRS_PER_CATEGORY * len(NAMES)
    t = PROMPT + RESPONSE
    hidden = torch.randn(n, 2, t, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (n, 2, t), generator=generator)
    labels[..., :PROMPT] = -100  # prompt tokens are not scored
    category = torch.arange(n) // PAIRS_PER_CATEGORY
    noisy = (category == NOISY).nonzero().flatten()
    for a, b in zip(noisy[0::2], noisy[1::2]):  # pair b is pair a with winner and loser swapped
        hidden[b] = hidden[a].flip(0)
        labels[b] = labels[a].flip(0)
    return hidden.to(device), labels.to(device), category.to(device)


def batch(hidden, labels, category, idx):
    """Rows [0, B) chosen, [B, 2B) rejected: the layout of every catdpo_kernels loss."""
    h = torch.cat([hidden[idx, 0], hidden[idx, 1]])
    y = torch.cat([labels[idx, 0], labels[idx, 1]])
    return h, y, category[idx]


def report(step: int, stats: ck.CategoryStats, margins) -> None:
    """One line: the step's mean loss over the learnable categories and over self-harm, the rates, the margins."""
    loss, count = stats.loss_sum[:-1], stats.count[:-1]  # the last row holds pairs without a category: none here
    learnable = [c for c in range(len(NAMES)) if c != NOISY]
    n_learnable = count[learnable].sum().clamp(min=1)
    mean_learnable = (loss[learnable].sum() / n_learnable).item()
    mean_noisy = (loss[NOISY] / count[NOISY].clamp(min=1)).item()
    beta_h = (stats.reward_margin_sum[:-1][learnable].sum() / n_learnable).item()
    rates = " ".join(f"{r:4.2f}" for r in margins.rate.tolist())
    values = " ".join(f"{m:4.2f}" for m in margins.value.tolist())
    print(f"{step:5d} {beta_h:7.2f}   {mean_learnable:9.3f} {mean_noisy:9.3f}   [{rates}]   [{values}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    hidden, labels, category = make_data(device, gen)

    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device)
    ref_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device).requires_grad_(False)
    ref_head.weight.copy_(lm_head.weight)
    opt = torch.optim.AdamW(lm_head.parameters(), lr=1e-2)
    # The criterion owns the margins (CategoryMargins options: init, lr, target, max_margin, names, ...).
    criterion = ck.CatDPOLinearLoss(
        len(NAMES),
        beta=0.1,
        loss_type="catdpo",
        shift_labels=True,
        init=0.5,
        lr=1.0,
        target=0.2,
        max_margin=3.0,
        names=NAMES,
    ).to(device)
    margins = criterion.margins

    print(f"categories, in column order: {NAMES}; target unsafe rate 0.2, margins capped at 3")
    print("(the loss first RISES while the margins climb: that is expected, see 'How to read this' below)")
    print(" step  βh(*)   loss: learnable self-harm   EMA unsafe rate per category   margin per category")
    for step in range(args.steps):
        for _ in range(args.grad_accum):
            idx = torch.randint(0, len(category), (args.batch_pairs,), generator=gen).to(device)
            h, y, cats = batch(hidden, labels, category, idx)
            out = criterion(h, lm_head.weight, y, cats, ref_hidden=h, ref_weight=ref_head.weight)
            (out.loss / args.grad_accum).backward()
        stats = ck.CategoryStats(criterion.pending_stats)  # the step's (C+1, K) table, summed over micro-batches
        opt.step()
        opt.zero_grad(set_to_none=True)
        criterion.update_margins()  # once per optimiser step; all-reduced when distributed
        if step % 5 == 0 or step == args.steps - 1:
            report(step, stats, margins)
    print("final margins:", {n: round(v, 2) for n, v in zip(NAMES, margins.value.tolist())})
    print("(*) mean beta*h over the learnable categories' pairs of the step")
    print(EXPLANATION)


if __name__ == "__main__":
    main()
