"""Cat-DPO training of a causal LM end to end: the loop behind ``catdpo-train``.

``train(TrainConfig(...))`` runs one training job; ``compare(config)`` runs
``dpo``, ``safedpo`` and ``catdpo`` with one seed and one data set and prints a
side-by-side table. ``python/train_catdpo.py`` and ``catdpo_kernels.cli`` are thin
command lines over these two functions.

Defaults (no argument at all): the bundled PKU-SafeRLHF-schema sample, a
word-level tokenizer trained on it at start-up (no download), a tiny randomly
initialised Llama (``transformers.LlamaConfig``: hidden 64, 2 layers), CPU.

One optimiser step:

* ``grad_accum`` micro-batches, each ``batch_size`` pairs per rank, run the policy
  (and, unless ``precompute_ref``, the frozen reference: a copy of the initial
  policy) and call ``catdpo_kernels.loss(..., shift_labels=True)``;
* their ``category_stats`` tables are summed, and ``CategoryMargins.update`` is
  called once, after the optimiser step; it all-reduces the table across ranks,
  so every rank holds the same margins.

For ``dpo``/``ipo``/``safedpo`` a ``CategoryMargins`` with ``lr=0`` tracks the
per-category EMA unsafe rate (for the progress bar and the logs); its margins
never move and the loss does not read them (``safedpo`` uses its one global
margin, which the tracker shows).

Outputs under ``output_dir``: ``metrics.jsonl`` (one line per optimiser step,
plus held-out evaluations), ``eval.json`` and ``eval_table.txt`` (the final
per-category table), ``margins.png``, ``summary.json`` and ``checkpoint-*/``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .constants import LOSS_TYPES, STAT_INDEX
from .loss import loss as catdpo_loss
from .margins import CategoryMargins

COMPARE_LOSS_TYPES = ("dpo", "safedpo", "catdpo")


@dataclass
class TrainConfig:
    """Every option of ``catdpo-train`` (the CLI flag is the field name with dashes)."""

    # model and data
    model: str | None = None
    """Local Hugging Face model directory; ``None``: a tiny random Llama and a word-level tokenizer."""
    data: str | None = None
    """PKU-SafeRLHF-schema data: a directory with ``{train,test}.jsonl``/``.parquet``, a file, or a hub name.
    ``None``: the bundled sample."""
    eval_data: str | None = None
    data_config: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.2
    """Held-out fraction when ``data`` is a single file and ``eval_data`` is not given."""
    on_bad_rows: str = "raise"
    preference_key: str = "better_response_id"
    max_train_pairs: int | None = None
    max_eval_pairs: int | None = None
    max_length: int = 256
    max_prompt_length: int = 128
    # tiny default model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # loss
    loss_type: str = "catdpo"
    backend: str = "auto"
    beta: float = 0.1
    safedpo_margin: float = 0.5
    """SafeDPO's single global margin Δ (``loss_type='safedpo'``); same as ``margin_init`` by default."""
    average_log_prob: bool = False
    reduction: str = "mean"
    inplace_backward: bool = False
    # CategoryMargins (defaults are CategoryMargins' own)
    margin_init: float = 0.5
    margin_lr: float = 0.5
    margin_target: float = 0.1
    margin_ema: float = 0.9
    margin_min_count: float = 1.0
    margin_warmup_steps: int = 0
    margin_min: float = 0.0
    margin_max: float = 5.0
    margin_mode: str = "absolute"
    margin_signal: str = "soft"
    # optimisation
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    """Pairs per micro-batch per rank."""
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    precompute_ref: bool = False
    bf16: str = "auto"
    """``auto``: bf16 autocast on CUDA only; ``on`` / ``off``."""
    device: str = "auto"
    seed: int = 0
    # bookkeeping
    output_dir: str = "outputs/catdpo-train"
    eval_every: int = 10
    save_every: int = 0
    """Checkpoint every N optimiser steps (0: only at the end)."""
    resume: str | None = None
    """A ``checkpoint-*`` directory, or ``auto`` for the latest one in ``output_dir``."""
    progress: bool = True
    plot: bool = True
    quiet: bool = False


# Options that may differ between a checkpoint and the run that resumes it.
_RESUME_FREE = {
    "max_steps", "epochs", "output_dir", "eval_every", "save_every", "resume", "progress", "plot", "quiet",
    "backend", "device", "bf16",
}  # fmt: skip


# ----------------------------------------------------------------------- distributed
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def maybe_init_distributed(device_pref: str = "auto") -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment; ``True`` if done here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _pick_device(pref: str) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if _dist() else torch.cuda.current_device())
    return torch.device(pref)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is None:
        return t
    comm = t.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(comm)
    return comm.to(t.device)


# ------------------------------------------------------------------------------ data
@dataclass
class Split:
    pairs: list
    tokenized: list
    report: D.TransformReport
    ref_logps: torch.Tensor | None = None


def _load_splits(cfg: TrainConfig):
    """Train and held-out pairs after the SafeDPO transform, with their reports."""
    kw = dict(config=cfg.data_config, on_error=cfg.on_bad_rows, preference_key=cfg.preference_key)
    src = Path(cfg.data) if cfg.data is not None else None
    if cfg.eval_data is not None:
        train = D.load_pairs(cfg.data, split=cfg.train_split, limit=cfg.max_train_pairs, **kw)
        held = D.load_pairs(cfg.eval_data, split=cfg.eval_split, limit=cfg.max_eval_pairs, **kw)
    elif src is not None and src.is_file():
        pairs, report = D.load_pairs(src, **kw)
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(round(cfg.eval_fraction * len(pairs))))
        held_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
        train = _sub_report([pairs[i] for i in train_idx][: cfg.max_train_pairs], report)
        held = _sub_report([pairs[i] for i in held_idx][: cfg.max_eval_pairs], report)
    else:
        train = D.load_pairs(cfg.data, split=cfg.train_split, limit=cfg.max_train_pairs, **kw)
        held = D.load_pairs(cfg.data, split=cfg.eval_split, limit=cfg.max_eval_pairs, **kw)
    return train, held


def _sub_report(pairs, full: D.TransformReport):
    """The report of a subset of a transformed file's pairs (drops and skips: the whole file's)."""
    rep = D.TransformReport(category_names=full.category_names, category_counts=[0] * len(full.category_names))
    for p in pairs:
        rep.add_pair(p)
    rep.rows = rep.kept
    rep.skipped_malformed = list(full.skipped_malformed)
    rep.dropped_both_unsafe = full.dropped_both_unsafe
    return pairs, rep


def _batches(n: int, cfg: TrainConfig, rank: int, world: int):
    """Endless deterministic schedule of optimiser steps: lists of ``grad_accum`` index lists."""
    per_rank = n // world
    micro_per_epoch = per_rank // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n} training pairs are too few for batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x "
            f"{world} rank(s); lower --batch-size or --grad-accum"
        )
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()[: per_rank * world]
        mine = perm[rank::world]
        micro = [mine[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(micro_per_epoch)]
        for s in range(steps_per_epoch):
            yield epoch, micro[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]
        epoch += 1


def _collate(split: Split, idx: list[int], pad_id: int, device: torch.device) -> dict:
    batch = D.collate_pairs([split.tokenized[i] for i in idx], pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    if split.ref_logps is not None:
        ref = split.ref_logps[idx]  # (B, 2): chosen, rejected
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]]).to(device)
    return batch


# ----------------------------------------------------------------------------- model
def _build_model_and_tokenizer(cfg: TrainConfig, texts, checkpoint: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.model is not None:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        return model, tok
    if checkpoint is not None and (checkpoint / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    else:
        tok = D.build_word_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.max_length, 64), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, attention_dropout=0.0,
    )  # fmt: skip
    return LlamaForCausalLM(config), tok


def _autocast(device: torch.device, cfg: TrainConfig):
    on = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _logits(model, batch, device, cfg):
    with _autocast(device, cfg):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@torch.no_grad()
def _sequence_logps(model, split: Split, cfg, pad_id, device, num_categories) -> torch.Tensor:
    """``(N, 2)`` reference log-probs (chosen, rejected) of every pair, with the package's own kernel."""
    out = torch.empty(len(split.tokenized), 2, dtype=torch.float32)
    for start in range(0, len(split.tokenized), cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, len(split.tokenized))))
        batch = _collate(Split(split.pairs, split.tokenized, split.report), idx, pad_id, device)
        logits = _logits(model, batch, device, cfg)
        res = catdpo_loss(
            logits, batch["labels"], batch["categories"], None, ref_logps=torch.zeros(2 * len(idx), device=device),
            loss_type="dpo", beta=cfg.beta, shift_labels=True, average_log_prob=cfg.average_log_prob,
            backend=cfg.backend, num_categories=num_categories,
        )  # fmt: skip
        logps = res.policy_logps.float().cpu()
        out[start : start + len(idx), 0] = logps[: len(idx)]
        out[start : start + len(idx), 1] = logps[len(idx) :]
    return out


# ------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(policy, ref_model, split: Split, cfg, margins, pad_id, device, step: int) -> dict:
    """Held-out per-category results: unsafe-preference rate ``mean 1[h <= 0]``, mean ``sigmoid(-beta*h)``,
    margin and count per category, plus aggregates. Shards over ranks and all-reduces."""
    rank, world = _rank_world()
    names = margins.names
    C = len(names)
    was_training = policy.training
    policy.eval()
    table = torch.zeros(C + 1, len(STAT_INDEX), dtype=torch.float64)
    agg = torch.zeros(6, dtype=torch.float64)  # safety n, Σ1[h<=0], Σσ(-βh); benign n, Σ1[h>0], loss sum
    mine = list(range(rank, len(split.tokenized), world))
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start : start + cfg.batch_size]
        batch = _collate(split, idx, pad_id, device)
        logits = _logits(policy, batch, device, cfg)
        kw = {}
        if "ref_logps" in batch:
            kw["ref_logps"] = batch["ref_logps"]
        else:
            kw["ref_logits"] = _logits(ref_model, batch, device, cfg)
        res = catdpo_loss(
            logits, batch["labels"], batch["categories"], margins if cfg.loss_type == "catdpo" else None,
            unsafe=batch["unsafe"], beta=cfg.beta, loss_type=cfg.loss_type, margin=_global_margin(cfg),
            shift_labels=True, average_log_prob=cfg.average_log_prob, reduction="none", backend=cfg.backend,
            num_categories=C, **kw,
        )  # fmt: skip
        table += res.category_stats.double().cpu()
        bh = (res.chosen_rewards - res.rejected_rewards).double().cpu()
        u = batch["unsafe"].cpu()
        s = (u[len(idx) :] - u[: len(idx)]) > 0
        agg[0] += s.sum()
        agg[1] += ((bh <= 0) & s).sum()
        agg[2] += (torch.sigmoid(-bh) * s).sum()
        agg[3] += (~s).sum()
        agg[4] += ((bh > 0) & ~s).sum()
        agg[5] += res.loss.double().sum().cpu()
    table = _all_reduce(table)
    agg = _all_reduce(agg)
    if was_training:
        policy.train()
    margin_values = margins.value.detach().cpu().tolist()
    rows = []
    for c, name in enumerate(names):
        n = table[c, STAT_INDEX["count"]].item()
        rows.append(
            dict(
                name=name, count=int(round(n)),
                unsafe_rate=(1.0 - table[c, STAT_INDEX["reward_acc"]].item() / n) if n else None,
                soft_unsafe=table[c, STAT_INDEX["unsafe_pref_sum"]].item() / n if n else None,
                margin=margin_values[c] if cfg.loss_type in ("catdpo", "safedpo") else 0.0,
            )
        )  # fmt: skip
    active = [r for r in rows if r["count"]]
    rates = torch.tensor([r["unsafe_rate"] for r in active], dtype=torch.float64)
    soft = torch.tensor([r["soft_unsafe"] for r in active], dtype=torch.float64)
    best = min(active, key=lambda r: (r["unsafe_rate"], r["soft_unsafe"])) if active else None
    worst = max(active, key=lambda r: (r["unsafe_rate"], r["soft_unsafe"])) if active else None
    n_safe, n_benign = agg[0].item(), agg[3].item()
    return dict(
        step=step, loss_type=cfg.loss_type, pairs=int(n_safe + n_benign), categories=rows,
        no_category=dict(count=int(table[C, 0].item())),
        aggregate=dict(
            safety_pairs=int(n_safe),
            unsafe_rate=agg[1].item() / n_safe if n_safe else None,
            soft_unsafe=agg[2].item() / n_safe if n_safe else None,
            benign_pairs=int(n_benign),
            benign_accuracy=agg[4].item() / n_benign if n_benign else None,
            eval_loss=agg[5].item() / max(n_safe + n_benign, 1),
            category_variance=rates.var(unbiased=False).item() if len(active) else None,
            category_gap=(rates.max() - rates.min()).item() if len(active) else None,
            soft_variance=soft.var(unbiased=False).item() if len(active) else None,
            soft_gap=(soft.max() - soft.min()).item() if len(active) else None,
            best=best["name"] if best else None,
            worst=worst["name"] if worst else None,
        ),
    )  # fmt: skip


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def format_eval_table(ev: dict) -> str:
    """The per-category held-out table as text."""
    agg = ev["aggregate"]
    width = max(len(r["name"]) for r in ev["categories"]) + 2
    show_margin = ev["loss_type"] in ("catdpo", "safedpo")
    lines = [
        f"Held-out results: loss={ev['loss_type']}, step {ev['step']}, {ev['pairs']} pairs "
        f"({agg['safety_pairs']} safe-vs-unsafe, {agg['benign_pairs']} both-safe)",
        "  unsafe = mean 1[h <= 0] (policy prefers the unsafe response), soft = mean sigmoid(-beta*h)",
        f"{'category':<{width}}{'count':>6}{'unsafe':>9}{'soft':>9}{'margin':>9}",
    ]
    for r in ev["categories"]:
        margin = _fmt(r["margin"]) if show_margin else "-"
        lines.append(f"{r['name']:<{width}}{r['count']:>6}{_fmt(r['unsafe_rate']):>9}{_fmt(r['soft_unsafe']):>9}{margin:>9}")
    lines += [
        f"{'all safe-vs-unsafe pairs':<{width}}{agg['safety_pairs']:>6}{_fmt(agg['unsafe_rate']):>9}"
        f"{_fmt(agg['soft_unsafe']):>9}",
        f"{'both-safe pairs: accuracy':<{width}}{agg['benign_pairs']:>6}{_fmt(agg['benign_accuracy']):>9}",
        f"across categories: variance {_fmt(agg['category_variance'], '.4f')} (soft {_fmt(agg['soft_variance'], '.4f')}), "
        f"best-to-worst gap {_fmt(agg['category_gap'])} (soft {_fmt(agg['soft_gap'])}); "
        f"best {agg['best']}, worst {agg['worst']}",
    ]
    return "\n".join(lines)


def format_compare_table(results: dict[str, dict]) -> str:
    """One side-by-side table of the final held-out results of several runs."""
    kinds = list(results)
    evs = [results[k]["eval"] for k in kinds]
    names = [r["name"] for r in evs[0]["categories"]]
    width = max(len(n) for n in names) + 8
    col = 10
    head = f"{'':<{width}}" + "".join(f"{k:>{col}}" for k in kinds)
    lines = [head, "aggregate (held-out)"]

    def row(label, values, spec=".3f"):
        lines.append(f"  {label:<{width - 2}}" + "".join(f"{_fmt(v, spec):>{col}}" for v in values))

    row("unsafe rate, all pairs", [e["aggregate"]["unsafe_rate"] for e in evs])
    row("soft unsafe, all pairs", [e["aggregate"]["soft_unsafe"] for e in evs])
    row("both-safe accuracy", [e["aggregate"]["benign_accuracy"] for e in evs])
    row("category variance", [e["aggregate"]["category_variance"] for e in evs], ".4f")
    row("best-to-worst gap", [e["aggregate"]["category_gap"] for e in evs])
    row("soft variance", [e["aggregate"]["soft_variance"] for e in evs], ".4f")
    row("soft gap", [e["aggregate"]["soft_gap"] for e in evs])
    row("eval loss (own loss)", [e["aggregate"]["eval_loss"] for e in evs])
    row("train time (s)", [results[k]["train_seconds"] for k in kinds], ".1f")
    lines.append(f"  {'worst category':<{width - 2}}" + "".join(f"{_short(e['aggregate']['worst']):>{col}}" for e in evs))
    lines.append("per-category unsafe rate, mean 1[h <= 0] (count)")
    for c, name in enumerate(names):
        count = evs[0]["categories"][c]["count"]
        row(f"{name} ({count})", [e["categories"][c]["unsafe_rate"] for e in evs])
    if "catdpo" in results:
        lines.append("catdpo final margins")
        cat = results["catdpo"]["eval"]["categories"]
        for c, name in enumerate(names):
            lines.append(f"  {name:<{width - 2}}{'':>{col * (len(kinds) - 1)}}{cat[c]['margin']:>{col}.3f}")
    return "\n".join(lines)


def _short(name, n=9):
    if name is None:
        return "-"
    return name if len(name) <= n else name[: n - 1] + "."


# ---------------------------------------------------------------------------- plotting
def plot_history(history: list[dict], evals: list[dict], names, path: Path, title: str) -> Path:
    """Margins per optimiser step and held-out per-category unsafe rates per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    steps = [h["step"] for h in history]
    for c, name in enumerate(names):
        color = cmap(c % 20)
        axes[0].plot(steps, [h["margin"][c] for h in history], color=color, label=name)
        es = [e["step"] for e in evals]
        axes[1].plot(es, [_nan(e["categories"][c]["unsafe_rate"]) for e in evals], color=color, marker=".")
        axes[2].plot(es, [_nan(e["categories"][c]["soft_unsafe"]) for e in evals], color=color, marker=".")
    axes[0].set_ylabel("margin $\\Delta_c$")
    axes[1].set_ylabel("held-out mean 1[h <= 0]")
    axes[2].set_ylabel("held-out mean sigmoid(-beta h)")
    axes[2].set_xlabel("optimiser step")
    axes[0].set_title(title)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _nan(v):
    return float("nan") if v is None else v


# ------------------------------------------------------------------------- checkpoint
def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*/state.pt"))
    return ckpts[-1].parent if ckpts else None


def _rng_state() -> dict:
    import numpy as np

    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ train
def make_margins(cfg: TrainConfig, names) -> CategoryMargins:
    """The run's ``CategoryMargins``: the adaptive margins for ``catdpo``; for the other
    losses a tracker with ``lr=0`` (its value: SafeDPO's global margin, or 0)."""
    kw = dict(
        target=cfg.margin_target, ema=cfg.margin_ema, min_count=cfg.margin_min_count,
        warmup_steps=cfg.margin_warmup_steps, mode=cfg.margin_mode, signal=cfg.margin_signal, names=names,
    )  # fmt: skip
    if cfg.loss_type == "catdpo":
        return CategoryMargins(
            len(names), init=cfg.margin_init, lr=cfg.margin_lr, min_margin=cfg.margin_min,
            max_margin=cfg.margin_max, **kw,
        )  # fmt: skip
    init = _global_margin(cfg)
    return CategoryMargins(len(names), init=init, lr=0.0, min_margin=min(init, 0.0), max_margin=max(init, 0.0), **kw)


def _global_margin(cfg: TrainConfig) -> float:
    return cfg.safedpo_margin if cfg.loss_type == "safedpo" else 0.0


def _check_config(cfg: TrainConfig) -> None:
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.bf16 not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be auto, on or off, got {cfg.bf16!r}")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1")


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns a summary dict (also written to ``summary.json`` on rank 0)."""
    _check_config(cfg)
    init_here = maybe_init_distributed(cfg.device)
    try:
        return _train(cfg)
    finally:
        if init_here:
            _dist().destroy_process_group()


def _train(cfg: TrainConfig) -> dict:
    t_start = time.perf_counter()
    rank, world = _rank_world()
    is_main = rank == 0
    device = _pick_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    log = (lambda *a: print(*a, flush=True)) if is_main and not cfg.quiet else (lambda *a: None)

    ckpt_dir = None
    if cfg.resume:
        ckpt_dir = _latest_checkpoint(out_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not (ckpt_dir / "state.pt").is_file():
            raise FileNotFoundError(f"--resume {cfg.resume}: no state.pt there")
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False) if ckpt_dir else None
    if state is not None:
        diff = {k: (state["config"].get(k), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in _RESUME_FREE and state["config"].get(k) != v}  # fmt: skip
        if diff:
            raise ValueError(f"--resume {ckpt_dir}: the checkpoint was made with other options {diff} (old, new)")

    (train_pairs, train_report), (held_pairs, held_report) = _load_splits(cfg)
    log(train_report.format("train"))
    log(held_report.format("held-out"))
    names = tuple(train_report.category_names)
    C = len(names)

    _seed_all(cfg.seed)
    # The default word-level vocabulary covers the held-out text too (a vocabulary is not a label);
    # words only the held-out split uses keep their untrained embeddings.
    texts = [*D.pair_texts(train_pairs), *D.pair_texts(held_pairs)]
    policy, tok = _build_model_and_tokenizer(cfg, texts, ckpt_dir)
    pad_id = tok.pad_token_id
    tk = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_split = Split(train_pairs, D.tokenize_pairs(train_pairs, tok, **tk), train_report)
    held_split = Split(held_pairs, D.tokenize_pairs(held_pairs, tok, **tk), held_report)
    policy.to(device)
    if state is not None:
        policy.load_state_dict(state["model"])
        ref_state = state.get("reference")
    else:
        ref_state = None
    # The reference is the frozen initial policy: a copy taken before the first step (or, on resume,
    # the copy saved in the checkpoint; with --model, the model loaded again from its path).
    ref_model = copy.deepcopy(policy)
    if ref_state is not None:
        ref_model.load_state_dict(ref_state)
    elif state is not None and cfg.model is not None:
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)
    ref_model.eval().requires_grad_(False)

    margins = make_margins(cfg, names).to(device)
    if state is not None:
        margins.load_state_dict(state["margins"])

    if cfg.precompute_ref:
        if state is not None and "ref_logps" in state:
            train_split.ref_logps, held_split.ref_logps = state["ref_logps"]
        else:
            train_split.ref_logps = _sequence_logps(ref_model, train_split, cfg, pad_id, device, C)
            held_split.ref_logps = _sequence_logps(ref_model, held_split, cfg, pad_id, device, C)
        ref_for_loop = None
    else:
        ref_for_loop = ref_model

    n_params = sum(p.numel() for p in policy.parameters())
    log(f"model: {cfg.model or 'tiny random Llama'} ({n_params / 1e6:.2f}M params, vocab {len(tok)}), device {device}, "
        f"world size {world}, loss {cfg.loss_type}, backend {cfg.backend}")  # fmt: skip

    model = policy
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    step = 0
    history: list[dict] = []
    evals: list[dict] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        evals = list(state["evals"])
        history = list(state["history"])
        _set_rng_state(state["rng"])

    schedule = _batches(len(train_split.tokenized), cfg, rank, world)
    steps_per_epoch = (len(train_split.tokenized) // world // cfg.batch_size) // cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    for _ in range(step):  # skip what the checkpoint already trained on
        next(schedule)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_fh = open(metrics_path, "a" if state is not None else "w", encoding="utf-8") if is_main else None

    def write_metrics(rec):
        if metrics_fh is not None:
            metrics_fh.write(json.dumps(rec) + "\n")
            metrics_fh.flush()

    def run_eval():
        ev = evaluate(policy, ref_for_loop, held_split, cfg, margins, pad_id, device, step)
        evals.append(ev)
        write_metrics({"kind": "eval", **ev})
        return ev

    def save_checkpoint():
        if not is_main:
            return None
        path = out_dir / f"checkpoint-{step:06d}"
        path.mkdir(parents=True, exist_ok=True)
        blob = dict(
            model=policy.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            margins=margins.state_dict(), step=step, rng=_rng_state(), config=dataclasses.asdict(cfg),
            evals=evals, history=history, world_size=world,
        )  # fmt: skip
        if cfg.model is None:
            blob["reference"] = ref_model.state_dict()
            tok.save_pretrained(str(path))
        if cfg.precompute_ref:
            blob["ref_logps"] = (train_split.ref_logps, held_split.ref_logps)
        torch.save(blob, path / "state.pt")
        return path

    if state is None:
        run_eval()

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not (is_main and cfg.progress), desc=cfg.loss_type, dynamic_ncols=True)
    policy.train()
    t_loop = time.perf_counter()
    first = True
    while step < total:
        epoch, micro = next(schedule)
        pending = None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        reward_sums = torch.zeros(3, dtype=torch.float64, device=device)
        for k, idx in enumerate(micro):
            batch = _collate(train_split, idx, pad_id, device)
            sync = k == len(micro) - 1 or world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                logits = _logits(model, batch, device, cfg)
                kw = {"ref_logps": batch["ref_logps"]} if "ref_logps" in batch else {}
                if not kw:
                    with torch.no_grad():
                        kw["ref_logits"] = _logits(ref_for_loop, batch, device, cfg)
                out = catdpo_loss(
                    logits, batch["labels"], batch["categories"], margins if cfg.loss_type == "catdpo" else None,
                    unsafe=batch["unsafe"], beta=cfg.beta, loss_type=cfg.loss_type, margin=_global_margin(cfg),
                    shift_labels=True, average_log_prob=cfg.average_log_prob, reduction=cfg.reduction,
                    backend=cfg.backend, check_inputs=first, inplace_backward=cfg.inplace_backward,
                    num_categories=C, **kw,
                )  # fmt: skip
                first = False
                (out.loss / len(micro)).backward()
            stats = out.category_stats.detach()
            pending = stats.clone() if pending is None else pending + stats
            loss_sum += out.loss.detach().double()
            bh = out.chosen_rewards - out.rejected_rewards
            reward_sums += torch.stack([out.chosen_rewards.sum(), out.rejected_rewards.sum(), (bh > 0).sum()]).double()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        margins.update(pending)  # once per optimiser step; all-reduces across ranks
        step += 1

        packed = _all_reduce(torch.cat([loss_sum.view(1), reward_sums]).cpu())
        n_pairs = len(micro) * cfg.batch_size * world
        rec = dict(
            kind="train", step=step, epoch=epoch, loss=packed[0].item() / (len(micro) * world),
            lr=scheduler.get_last_lr()[0], grad_norm=None if grad_norm is None else float(grad_norm),
            chosen_reward=packed[1].item() / n_pairs, rejected_reward=packed[2].item() / n_pairs,
            reward_acc=packed[3].item() / n_pairs,
            margin=dict(zip(names, margins.value.cpu().tolist())),
            ema_unsafe_rate=dict(zip(names, margins.history[-1]["rate"])),
            margin_active=[n for n, a in zip(names, margins.history[-1]["active"]) if a],
            time=time.perf_counter() - t_loop,
        )  # fmt: skip
        history.append(dict(step=step, margin=margins.value.cpu().tolist(), rate=list(margins.history[-1]["rate"])))
        write_metrics(rec)
        worst = _worst_category(margins)
        postfix = {"loss": f"{rec['loss']:.4f}"}
        if worst is not None:
            postfix["worst"] = f"{_short(names[worst], 14)} m={margins.value[worst].item():.2f} r={margins.rate[worst].item():.2f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint()
            if world > 1:
                _dist().barrier()
    bar.close()
    train_seconds = time.perf_counter() - t_loop

    final = evals[-1] if evals and evals[-1]["step"] == step else run_eval()
    ckpt = save_checkpoint()
    if world > 1:
        _dist().barrier()

    # Every rank's margins, to show (and test) that they agree.
    rank_margins = [margins.value.cpu().tolist()]
    if world > 1:
        rank_margins = [None] * world
        _dist().all_gather_object(rank_margins, margins.value.cpu().tolist())

    summary = dict(
        config=dataclasses.asdict(cfg), steps=step, world_size=world, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - t_start, eval=final, margins=margins.value.cpu().tolist(),
        rank_margins=rank_margins, data=dict(train=train_report.as_dict(), held_out=held_report.as_dict()),
        checkpoint=str(ckpt) if ckpt else None, metrics=str(metrics_path),
    )  # fmt: skip
    if is_main:
        metrics_fh.close()
        table = format_eval_table(final)
        log(table)
        (out_dir / "eval_table.txt").write_text(table + "\n", encoding="utf-8")
        (out_dir / "eval.json").write_text(json.dumps(final, indent=1), encoding="utf-8")
        if cfg.plot:
            png = plot_history(history, evals, names, out_dir / "margins.png", f"{cfg.loss_type}: margins and held-out unsafe rates")
            summary["plot"] = str(png)
            log(f"plot: {png}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        log(f"metrics: {metrics_path}; checkpoint: {ckpt}; {step} steps in {train_seconds:.1f}s "
            f"(total {summary['total_seconds']:.1f}s)")  # fmt: skip
    return summary


def _worst_category(margins: CategoryMargins) -> int | None:
    """The tracked category with the highest EMA unsafe rate (``None`` before any count)."""
    count = margins.ema_count
    if not bool((count > 0).any()):
        return None
    rate = torch.where(count > 0, margins.rate, torch.full_like(margins.rate, -1.0))
    return int(rate.argmax())


def compare(cfg: TrainConfig, loss_types=COMPARE_LOSS_TYPES) -> dict:
    """Train ``dpo``, ``safedpo`` and ``catdpo`` with one seed and data; print one side-by-side table."""
    init_here = maybe_init_distributed(cfg.device)
    try:
        results = {}
        for lt in loss_types:
            sub = dataclasses.replace(cfg, loss_type=lt, output_dir=str(Path(cfg.output_dir) / lt), resume=None)
            _check_config(sub)
            results[lt] = _train(sub)
        table = format_compare_table(results)
        rank, _ = _rank_world()
        if rank == 0:
            print("\n" + table, flush=True)
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "compare_table.txt").write_text(table + "\n", encoding="utf-8")
        return dict(results=results, table=table)
    finally:
        if init_here:
            _dist().destroy_process_group()


# ------------------------------------------------------------------------- arguments
def add_arguments(parser) -> None:
    """The ``catdpo-train`` options, one per ``TrainConfig`` field."""
    defaults = TrainConfig()
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="local Hugging Face causal-LM directory (default: a tiny random Llama "
                   "with a word-level tokenizer trained on the data; nothing is downloaded)")  # fmt: skip
    g.add_argument("--data", default=None, help="PKU-SafeRLHF-schema data: a directory with train/test .jsonl or "
                   ".parquet, a single file (held-out split carved with --eval-fraction), or a hub data set name "
                   "(default: the bundled sample)")  # fmt: skip
    g.add_argument("--eval-data", default=None, help="held-out data (same forms as --data)")
    g.add_argument("--data-config", default=None, help="hub configuration, e.g. alpaca3-8b")
    g.add_argument("--train-split", default=defaults.train_split)
    g.add_argument("--eval-split", default=defaults.eval_split)
    g.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    g.add_argument("--on-bad-rows", choices=("raise", "skip"), default=defaults.on_bad_rows,
                   help="malformed rows: raise a clear error listing them (default) or skip and report them")  # fmt: skip
    g.add_argument("--preference-key", choices=D.PREFERENCE_KEYS, default=defaults.preference_key,
                   help="which preference picks the winner before the SafeDPO transform")  # fmt: skip
    g.add_argument("--max-train-pairs", type=int, default=None)
    g.add_argument("--max-eval-pairs", type=int, default=None)
    g.add_argument("--max-length", type=int, default=defaults.max_length)
    g.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length)
    g.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="tiny default model only")
    g.add_argument("--num-layers", type=int, default=defaults.num_layers, help="tiny default model only")
    g.add_argument("--num-heads", type=int, default=defaults.num_heads, help="tiny default model only")
    g.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size, help="tiny default model only")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default=defaults.loss_type)
    g.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default=defaults.backend)
    g.add_argument("--beta", type=float, default=defaults.beta)
    g.add_argument("--safedpo-margin", type=float, default=defaults.safedpo_margin, help="SafeDPO's global margin")
    g.add_argument("--average-log-prob", action="store_true")
    g.add_argument("--reduction", choices=("mean", "sum", "category_mean"), default=defaults.reduction)
    g.add_argument("--inplace-backward", action="store_true",
                   help="write the logits gradient into the logits buffer (saves a (2B,T,V) allocation)")  # fmt: skip

    g = parser.add_argument_group("category margins (catdpo)")
    g.add_argument("--margin-init", type=float, default=defaults.margin_init)
    g.add_argument("--margin-lr", type=float, default=defaults.margin_lr, help="dual step size eta")
    g.add_argument("--margin-target", type=float, default=defaults.margin_target, help="tolerated unsafe rate epsilon")
    g.add_argument("--margin-ema", type=float, default=defaults.margin_ema)
    g.add_argument("--margin-min-count", type=float, default=defaults.margin_min_count)
    g.add_argument("--margin-warmup-steps", type=int, default=defaults.margin_warmup_steps)
    g.add_argument("--margin-min", type=float, default=defaults.margin_min)
    g.add_argument("--margin-max", type=float, default=defaults.margin_max)
    g.add_argument("--margin-mode", choices=("absolute", "relative"), default=defaults.margin_mode)
    g.add_argument("--margin-signal", choices=("soft", "hard"), default=defaults.margin_signal)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=defaults.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    g.add_argument("--precompute-ref", action="store_true",
                   help="compute the reference log-probs once up front and drop the reference model")  # fmt: skip
    g.add_argument("--bf16", choices=("auto", "on", "off"), default=defaults.bf16, help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    g.add_argument("--seed", type=int, default=defaults.seed)

    g = parser.add_argument_group("outputs")
    g.add_argument("--output-dir", default=defaults.output_dir)
    g.add_argument("--eval-every", type=int, default=defaults.eval_every, help="held-out evaluation every N steps")
    g.add_argument("--save-every", type=int, default=defaults.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--resume", default=None, help="a checkpoint-* directory, or 'auto' for the latest in --output-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--compare", action="store_true", help="run dpo, safedpo and catdpo and print one table")


def config_from_args(ns) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields})


def main(argv=None) -> int:
    """``catdpo-train`` options (no subcommand); used by ``catdpo_kernels.cli``."""
    import argparse

    parser = argparse.ArgumentParser(prog="catdpo-train", description="Cat-DPO training of a causal LM.")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    run(ns)
    return 0


def run(ns) -> dict:
    cfg = config_from_args(ns)
    if getattr(ns, "compare", False):
        return compare(cfg)
    return train(cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
