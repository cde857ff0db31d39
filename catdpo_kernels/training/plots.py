"""The figures: ``margins.png`` of one run and ``compare.png`` of ``--compare``.

Nineteen categories in nineteen colours cannot be told apart, so ``margins.png``
colours only the ``HIGHLIGHT`` categories with the highest final held-out unsafe
rate (full names, one legend for every panel) and draws the rest in grey. Only
panels that carry information are drawn: the margin panel for ``catdpo`` alone
(``dpo`` has none, ``safedpo`` one constant margin, said in the title).
"""

from __future__ import annotations

from pathlib import Path

HIGHLIGHT = 5
# Okabe-Ito: distinguishable with every common colour-vision deficiency, and in greyscale print.
PALETTE = ("#D55E00", "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9")
GREY = "#c4c4c4"
METHOD_COLORS = {"dpo": "#999999", "safedpo": "#56B4E9", "catdpo": "#D55E00", "ipo": "#009E73"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan(v):
    return float("nan") if v is None else v


def worst_categories(final_eval: dict, k: int = HIGHLIGHT) -> list[int]:
    """Indices of the ``k`` categories with the highest final held-out unsafe rate (soft rate breaks ties)."""
    rows = [(c, r) for c, r in enumerate(final_eval["categories"]) if r["count"]]
    rows.sort(key=lambda cr: (cr[1]["unsafe_rate"], cr[1]["soft_unsafe"]), reverse=True)
    return [c for c, _ in rows[:k]]


def _styles(names, highlight: list[int]) -> list[dict]:
    """Per category: colour, width, z-order and legend label (grey, unlabelled, behind for the others)."""
    styles = [dict(color=GREY, lw=0.9, zorder=1, label=None) for _ in names]
    for rank, c in enumerate(highlight):
        styles[c] = dict(color=PALETTE[rank % len(PALETTE)], lw=2.0, zorder=3, label=names[c])
    return styles


def _margin_panel(ax, history, styles, cfg_note: str) -> None:
    steps = [h["step"] for h in history]
    for c, st in enumerate(styles):
        ax.plot(steps, [h["margin"][c] for h in history], color=st["color"], lw=st["lw"], zorder=st["zorder"])
    ax.set_ylabel("margin $\\Delta_c$")
    ax.set_title(f"per-category margin: grows while the category's unsafe rate is above target{cfg_note}", fontsize=10)


def _rate_panel(ax, history, styles, target: float | None, drives_margins: bool) -> None:
    steps = [h["step"] for h in history]
    for c, st in enumerate(styles):
        ax.plot(steps, [_nan(h["rate"][c]) for h in history], color=st["color"], lw=st["lw"], zorder=st["zorder"])
    if target is not None:
        ax.axhline(target, color="black", ls=":", lw=1.2, zorder=4)
    ax.set_ylabel("training EMA\nunsafe rate $r_c$")
    ax.set_ylim(-0.02, 1.02)
    what = "what the margins follow" if drives_margins else "tracked only (the loss has no per-category margin)"
    ax.set_title(f"{what}: EMA of the training batches' unsafe-preference rate", fontsize=10)


def _held_out_panel(ax, evals, styles) -> None:
    steps = [e["step"] for e in evals]
    for c, st in enumerate(styles):
        rates = [_nan(e["categories"][c]["unsafe_rate"]) for e in evals]
        ax.plot(
            steps, rates, color=st["color"], lw=st["lw"], zorder=st["zorder"], marker="o", ms=3 if st["label"] else 0
        )
    overall = [_nan(e["aggregate"]["unsafe_rate"]) for e in evals]
    ax.plot(steps, overall, color="black", lw=2.4, ls="--", zorder=5)
    ax.set_ylabel("held-out\nunsafe rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        "held-out: share of pairs where the policy prefers the unsafe response (a tie, e.g. at step 0, counts half)",
        fontsize=10,
    )


def _legend(fig, styles, highlight: list[int], n_other: int, target: float | None) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[c]["color"], lw=2.0, label=styles[c]["label"]) for c in highlight]
    handles.append(Line2D([], [], color=GREY, lw=1.5, label=f"the other {n_other} categories"))
    handles.append(Line2D([], [], color="black", lw=2.4, ls="--", label="held-out, all safe-vs-unsafe pairs"))
    if target is not None:
        handles.append(Line2D([], [], color="black", lw=1.2, ls=":", label=f"target unsafe rate {target:g}"))
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.965))


def plot_run(history: list[dict], evals: list[dict], names, path: Path, loss_type: str, options: dict) -> Path:
    """``margins.png``: the margins (catdpo only), their EMA signal and the held-out rates; worst categories in colour.

    ``options``: ``target`` (the margins' target rate) and ``safedpo_margin``.
    """
    return _save(run_figure(history, evals, names, loss_type, options), path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def run_figure(history: list[dict], evals: list[dict], names, loss_type: str, options: dict):
    """The figure of ``plot_run``."""
    plt = _pyplot()
    highlight = worst_categories(evals[-1])
    styles = _styles(names, highlight)
    target = options.get("target")
    panels = 3 if loss_type == "catdpo" else 2
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.1 * panels + 1.3), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    if loss_type == "catdpo":
        _margin_panel(axes.pop(0), history, styles, f" {target:g}" if target is not None else "")
    catdpo = loss_type == "catdpo"
    _rate_panel(axes[0], history, styles, target if catdpo else None, drives_margins=catdpo)
    _held_out_panel(axes[1], evals, styles)
    axes[1].set_xlabel("optimiser step")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    margin_note = {"dpo": "no margin", "safedpo": f"one global margin {options.get('safedpo_margin', 0):g}"}
    note = margin_note.get(loss_type, "per-category adaptive margins")
    fig.suptitle(f"{loss_type} ({note}): the {len(highlight)} categories with the highest final held-out unsafe rate")
    _legend(fig, styles, highlight, len(names) - len(highlight), target if catdpo else None)
    fig.tight_layout(rect=(0, 0, 1, 0.915 if panels == 3 else 0.895))
    return fig


# ------------------------------------------------------------------ --compare
def _category_bars(ax, results: dict) -> None:
    """Grouped horizontal bars: per category, each method's held-out unsafe rate; the worst categories on top."""
    kinds = list(results)
    cats = results[kinds[0]]["eval"]["categories"]
    shown = [c for c, r in enumerate(cats) if r["count"]]

    def mean_rate(c):
        return sum(results[k]["eval"]["categories"][c]["unsafe_rate"] for k in kinds) / len(kinds)

    order = sorted(shown, key=mean_rate)  # barh draws bottom-up: the worst ends on top
    height = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        ys = [i + ((len(kinds) - 1) / 2 - j) * height for i in range(len(order))]  # first method on top
        values = [results[k]["eval"]["categories"][c]["unsafe_rate"] for c in order]
        ax.barh(ys, values, height=height, color=METHOD_COLORS.get(k, PALETTE[j]), label=k)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"{cats[c]['name']} (n={cats[c]['count']})" for c in order], fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out unsafe rate (policy prefers the unsafe response; a tie counts half)")
    ax.set_title("per category (n: held-out safe-vs-unsafe pairs)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)


def _aggregate_bars(ax, results: dict, key: str, title: str, spec: str) -> None:
    kinds = list(results)
    values = [results[k]["eval"]["aggregate"][key] or 0.0 for k in kinds]
    bars = ax.bar(kinds, values, color=[METHOD_COLORS.get(k, PALETTE[j]) for j, k in enumerate(kinds)])
    for bar, v in zip(bars, values):
        ax.annotate(format(v, spec), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(values) * 1.25 if max(values) > 0 else 1)
    ax.grid(axis="y", alpha=0.3)


def plot_compare(results: dict, path: Path) -> Path:
    """``compare.png``: per-category unsafe rates side by side, and the spread across categories."""
    return _save(compare_figure(results), path)


def compare_figure(results: dict):
    """The figure of ``plot_compare``."""
    plt = _pyplot()
    fig = plt.figure(figsize=(14, 9))
    grid = fig.add_gridspec(3, 2, width_ratios=(2.4, 1))
    _category_bars(fig.add_subplot(grid[:, 0]), results)
    _aggregate_bars(fig.add_subplot(grid[0, 1]), results, "unsafe_rate", "unsafe rate, all safe-vs-unsafe pairs", ".3f")
    _aggregate_bars(fig.add_subplot(grid[1, 1]), results, "category_variance", "variance across categories", ".4f")
    _aggregate_bars(fig.add_subplot(grid[2, 1]), results, "category_gap", "best-to-worst category gap", ".3f")
    steps = results[next(iter(results))]["steps"]
    fig.suptitle(f"{' vs '.join(results)}: held-out results after {steps} steps, same seed and data")
    fig.tight_layout()
    return fig
