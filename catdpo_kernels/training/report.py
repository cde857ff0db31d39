"""What a run shows: ``metrics.jsonl``, the held-out table, the ``--compare`` table, the progress bar, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..margins import CategoryMargins


class MetricsLog:
    """``metrics.jsonl``, one JSON record a line, flushed as written; on rank 0 only (``path=None`` elsewhere).

    A resumed run appends to the file of the run it resumes.
    """

    def __init__(self, path: Path | None, append: bool):
        self.path = path
        self._fh = open(path, "a" if append else "w", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def short(name, n=9):
    """``name`` cut to ``n`` characters (a trailing dot marks the cut); ``-`` for ``None``."""
    if name is None:
        return "-"
    return name if len(name) <= n else name[: n - 1] + "."


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
        lines.append(
            f"{r['name']:<{width}}{r['count']:>6}{_fmt(r['unsafe_rate']):>9}{_fmt(r['soft_unsafe']):>9}{margin:>9}"
        )
    lines += [
        f"{'all safe-vs-unsafe pairs':<{width}}{agg['safety_pairs']:>6}{_fmt(agg['unsafe_rate']):>9}"
        f"{_fmt(agg['soft_unsafe']):>9}",
        f"{'both-safe pairs: accuracy':<{width}}{agg['benign_pairs']:>6}{_fmt(agg['benign_accuracy']):>9}",
        f"across categories: variance {_fmt(agg['category_variance'], '.4f')} "
        f"(soft {_fmt(agg['soft_variance'], '.4f')}), "
        f"best-to-worst gap {_fmt(agg['category_gap'])} (soft {_fmt(agg['soft_gap'])}); "
        f"best {agg['best']}, worst {agg['worst']}",
    ]
    return "\n".join(lines)


# (label, aggregate key, format) of the aggregate rows of the --compare table
_COMPARE_AGGREGATES = (
    ("unsafe rate, all pairs", "unsafe_rate", ".3f"),
    ("soft unsafe, all pairs", "soft_unsafe", ".3f"),
    ("both-safe accuracy", "benign_accuracy", ".3f"),
    ("category variance", "category_variance", ".4f"),
    ("best-to-worst gap", "category_gap", ".3f"),
    ("soft variance", "soft_variance", ".4f"),
    ("soft gap", "soft_gap", ".3f"),
    ("eval loss (own loss)", "eval_loss", ".3f"),
)


def format_compare_table(results: dict[str, dict]) -> str:
    """One side-by-side table of the final held-out results of several runs."""
    kinds = list(results)
    evs = [results[k]["eval"] for k in kinds]
    names = [r["name"] for r in evs[0]["categories"]]
    width = max(len(n) for n in names) + 8
    col = 10
    lines = [f"{'':<{width}}" + "".join(f"{k:>{col}}" for k in kinds), "aggregate (held-out)"]

    def row(label, values, spec=".3f"):
        lines.append(f"  {label:<{width - 2}}" + "".join(f"{_fmt(v, spec):>{col}}" for v in values))

    for label, key, spec in _COMPARE_AGGREGATES:
        row(label, [e["aggregate"][key] for e in evs], spec)
    row("train time (s)", [results[k]["train_seconds"] for k in kinds], ".1f")
    worst = [short(e["aggregate"]["worst"]) for e in evs]
    lines.append(f"  {'worst category':<{width - 2}}" + "".join(f"{w:>{col}}" for w in worst))
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


def worst_category(margins: CategoryMargins) -> int | None:
    """The tracked category with the highest EMA unsafe rate (``None`` before any count)."""
    count = margins.ema_count
    if not bool((count > 0).any()):
        return None
    rate = torch.where(count > 0, margins.rate, torch.full_like(margins.rate, -1.0))
    return int(rate.argmax())


def progress_postfix(loss: float, margins: CategoryMargins) -> dict:
    """The progress bar's postfix: the step's loss and the category with the highest EMA unsafe rate."""
    postfix = {"loss": f"{loss:.4f}"}
    worst = worst_category(margins)
    if worst is not None:
        name = short(margins.names[worst], 14)
        postfix["worst"] = f"{name} m={margins.value[worst].item():.2f} r={margins.rate[worst].item():.2f}"
    return postfix


def plot_history(history: list[dict], evals: list[dict], names, path: Path, title: str) -> Path:
    """Margins per optimiser step and held-out per-category unsafe rates per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    steps = [h["step"] for h in history]
    es = [e["step"] for e in evals]
    for c, name in enumerate(names):
        color = cmap(c % 20)
        axes[0].plot(steps, [h["margin"][c] for h in history], color=color, label=name)
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
