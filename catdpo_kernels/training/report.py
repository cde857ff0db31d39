"""What a run shows: ``metrics.jsonl``, ``train.log``, the held-out table, the ``--compare`` table, the progress bar.

The figures are drawn by :mod:`catdpo_kernels.training.plots`.

**Unsafe rate and ties.** A pair whose policy and reference log-ratios are equal
(``h = 0``: every pair before the first step, when the policy *is* the
reference) is no evidence either way, so the program counts a tie as half:
``unsafe = 1[h < 0] + ½·1[h = 0]``, the value the soft rate ``σ(−β·h)`` takes at
``h = 0`` (and the AUC convention). The same holds for the reward accuracy
(``1[h > 0] + ½·1[h = 0]``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TIE_RULE = "unsafe = mean of 1[h < 0] + 0.5*1[h = 0] (a tie counts half), soft = mean sigmoid(-beta*h)"


class MetricsLog:
    """``metrics.jsonl``, one JSON record a line, flushed as written; on rank 0 only (``path=None`` elsewhere).

    A resumed run first cuts the file back to the checkpoint's step (``truncate_metrics``), then appends.
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


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps ``<= step`` (and drop a line a crash cut short); returns the train records kept.

    A run resumed from an older checkpoint would otherwise log its steps twice.
    """
    if not path.is_file():
        return 0
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return sum(1 for line in kept if json.loads(line).get("kind") == "train")


class RunLog:
    """The run's messages: on the console (rank 0, unless quiet) and in ``train.log`` (rank 0).

    Warnings always reach stderr. ``--compare`` sends each run's detail to its ``train.log`` only.
    """

    def __init__(self, path: Path | None, console: bool):
        self.path = path
        self.console = console

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        if self.console:
            print(text, flush=True)
        self._file(text)

    def warn(self, message: str) -> None:
        if self.path is not None or self.console:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        self._file(f"warning: {message}")

    def _file(self, text: str) -> None:
        if self.path is not None and self.path.parent.is_dir():
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")


def report_finished(cfg, plan, console: bool) -> dict:
    """A rerun of a finished run: say so, show its table again, return its summary (``already_finished``)."""
    summary = dict(plan.finished, already_finished=True)
    if console and not cfg.quiet:
        table = plan.out_dir / "eval_table.txt"
        if table.is_file():
            print(table.read_text(encoding="utf-8").rstrip())
        print(
            f"{plan.out_dir} holds this run, already finished ({summary['steps']} steps): nothing to train. "
            "--max-steps N continues it further, --overwrite trains it again.",
            flush=True,
        )
    return summary


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
        f"  {TIE_RULE}",
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
    """One side-by-side table of the final held-out results of several runs (full category names)."""
    kinds = list(results)
    evs = [results[k]["eval"] for k in kinds]
    cats = evs[0]["categories"]
    labels = [f"{r['name']} ({r['count']})" for r in cats]
    width = max(len(label) for label in [*labels, *(a[0] for a in _COMPARE_AGGREGATES)]) + 4
    col = max(9, *(len(k) + 2 for k in kinds))
    agg0 = evs[0]["aggregate"]
    lines = [
        f"Held-out results after {results[kinds[0]]['steps']} steps, same seed and data: {evs[0]['pairs']} pairs "
        f"({agg0['safety_pairs']} safe-vs-unsafe, {agg0['benign_pairs']} both-safe)",
        f"  {TIE_RULE}",
        f"{'':<{width}}" + "".join(f"{k:>{col}}" for k in kinds),
    ]

    def row(label, values, spec=".3f", extra=""):
        lines.append(f"  {label:<{width - 2}}" + "".join(f"{_fmt(v, spec):>{col}}" for v in values) + extra)

    for label, key, spec in _COMPARE_AGGREGATES:
        row(label, [e["aggregate"][key] for e in evs], spec)
    row("train time (s)", [results[k]["train_seconds"] for k in kinds], ".1f")
    has_margins = "catdpo" in results
    heading = f"{'per-category unsafe rate (pairs)':<{width}}" + "".join(f"{k:>{col}}" for k in kinds)
    lines.append(heading + (f"{'catdpo margin':>{col + 6}}" if has_margins else ""))
    margins = [r["margin"] for r in results["catdpo"]["eval"]["categories"]] if has_margins else None
    for c, label in enumerate(labels):
        extra = f"{margins[c]:>{col + 6}.3f}" if has_margins else ""
        row(label, [e["categories"][c]["unsafe_rate"] for e in evs], extra=extra)
    for k, e in zip(kinds, evs):
        worst = e["aggregate"]["worst"]
        rate = next((r["unsafe_rate"] for r in e["categories"] if r["name"] == worst), None)
        lines.append(f"  worst category, {k}: {worst or '-'} ({_fmt(rate)})")
    return "\n".join(lines)


def worst_category(margins) -> int | None:
    """The tracked category with the highest EMA unsafe rate (``None`` before any count)."""
    import torch

    count = margins.ema_count
    if not bool((count > 0).any()):
        return None
    rate = torch.where(count > 0, margins.rate, torch.full_like(margins.rate, -1.0))
    return int(rate.argmax())


def progress_postfix(loss: float, margins) -> dict:
    """The progress bar's postfix: the step's loss and the category with the highest EMA unsafe rate."""
    postfix = {"loss": f"{loss:.4f}"}
    worst = worst_category(margins)
    if worst is not None:
        name = short(margins.names[worst], 14)
        postfix["worst"] = f"{name} m={margins.value[worst].item():.2f} r={margins.rate[worst].item():.2f}"
    return postfix
