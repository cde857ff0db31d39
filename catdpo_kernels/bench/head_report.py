"""Output of the fused-head mode: terminal table, markdown, plot and the summary digest.

Everything is read from the same ``report`` dict as the JSON (``settings.mode == "head"``),
so what the table shows is what the JSON records. ``report.py`` dispatches here.
"""

from __future__ import annotations

from .head_cases import FLOP_MODEL, PEERS
from .report import (
    NO_MATPLOTLIB,
    MiB,
    case_label,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    header_lines,
    markdown_intro,
    markdown_targets,
    note_lines,
    pyplot,
    save_figure,
    verdict,
    verdict_lines,
)

COLUMNS = (
    ("case", "case"),
    ("variant", "variant"),
    ("sched", "sched"),
    ("fwd ms", "fwd"),
    ("bwd ms", "bwd"),
    ("fwd+bwd ms", "fwd_bwd"),
    ("time vs naive", "time_ratio"),
    ("rise-grad MiB", "rise_excl"),
    ("mem vs naive", "mem_ratio"),
    ("GFLOP", "gflop"),
    ("TFLOP/s", "tflops"),
    ("% GEMM", "pct_gemm"),
)
ROLE_COLORS = {"naive": "tab:gray", "compiled": "silver", "ours": "tab:blue", "peer": "tab:orange"}
PEER_COLUMNS = (
    ("case", "case"),
    ("ours", "ours"),
    ("vs", "peer"),
    ("peer fwd+bwd ms", "peer_ms"),
    ("peer rise-grad MiB", "peer_rise"),
    ("time ours/peer", "time"),
    ("mem ours/peer", "mem"),
)


def _target(r: dict, metric: str) -> dict | None:
    return next((t for t in r.get("targets") or [] if t["metric"] == metric), None)


def _with_verdict(text: str, r: dict, metric: str) -> str:
    t = _target(r, metric)
    if t is None or text == "-":
        return text
    return f"{text} {verdict(t['ok'])}"


def fmt_times(v) -> str:
    return "-" if v is None else f"{fmt_ratio(v)}x"


def _sig(v: float) -> str:
    """Three significant digits, no exponent for the usual range."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def row_cells(r: dict) -> dict:
    cells = {"case": case_label(r, "head"), "variant": r["label"]}
    if r["status"] != "ok":
        cells["fwd"] = f"{r['status']}: {r.get('note') or ''}"
        return cells
    t, mem, ratios, flops = r["time_ms"], r.get("memory") or {}, r.get("ratios") or {}, r.get("flops") or {}
    dagger = "+" if r.get("grads_in_forward") else ""
    tflops, pct = flops.get("TFLOPs"), flops.get("pct_of_gemm")
    cells.update(
        sched=r.get("schedule") or "-",
        fwd=fmt_ms(t.get("fwd")) + (dagger if t.get("fwd") else ""),
        bwd=fmt_ms(t.get("bwd")),
        fwd_bwd=fmt_ms(t.get("fwd_bwd")),
        time_ratio=_with_verdict(fmt_times(ratios.get("time_ratio_fwd_bwd")), r, "time_ratio_fwd_bwd"),
        rise_excl=_with_verdict(fmt_mib(mem.get("fwd_bwd_rise_excl_grad_bytes")), r, "rise_excl_grad_bytes"),
        mem_ratio=_with_verdict(fmt_ratio(ratios.get("memory_ratio_excl_grad")), r, "memory_ratio_excl_grad"),
        gflop="-" if not flops.get("flops") else _sig(flops["flops"] / 1e9),
        tflops="-" if tflops is None else _sig(tflops),
        pct_gemm=_with_verdict("-" if pct is None else f"{pct:.0f}%", r, "pct_of_gemm"),
    )
    return cells


def peer_rows(report: dict) -> list[dict]:
    """One row per (our unfrozen row, peer) of the ``head`` group, plus the fastest/leanest lines on CUDA."""
    results = report["results"]
    out = []
    for r in results:
        if r["group"] != "head" or r.get("role") != "ours" or r.get("frozen") or r["status"] != "ok":
            continue
        peers = {p["label"]: p for p in results if p["case"] == r["case"] and p.get("role") == "peer"}
        vs = (r.get("ratios") or {}).get("vs") or {}
        for label in [p for p in PEERS if p in peers]:
            p = peers[label]
            cells = {"case": r["case"], "ours": r["label"], "peer": label}
            if p["status"] != "ok":
                cells["peer_ms"] = f"{p['status']}: {p.get('note') or ''}"
                out.append(cells)
                continue
            ratio = vs.get(label) or {}
            cells.update(
                peer_ms=fmt_ms(p["time_ms"].get("fwd_bwd")),
                peer_rise=fmt_mib((p.get("memory") or {}).get("fwd_bwd_rise_excl_grad_bytes")),
                time=_with_verdict(fmt_times(ratio.get("time_ratio_fwd_bwd")), r, f"vs.{label}.time_ratio_fwd_bwd"),
                mem=_with_verdict(
                    fmt_ratio(ratio.get("memory_ratio_excl_grad")), r, f"vs.{label}.memory_ratio_excl_grad"
                ),
            )
            out.append(cells)
        ratios = r.get("ratios") or {}
        fastest, leanest = ratios.get("vs_fastest_peer"), ratios.get("vs_leanest_peer")
        if _target(r, "vs_fastest_peer.time_ratio_fwd_bwd") or _target(r, "vs_leanest_peer.memory_ratio_excl_grad"):
            out.append(
                {
                    "case": r["case"],
                    "ours": r["label"],
                    "peer": f"fastest: {fastest['peer'] if fastest else 'n/a'}; "
                    f"leanest: {leanest['peer'] if leanest else 'n/a'}",
                    "peer_ms": "",
                    "peer_rise": "",
                    "time": _with_verdict(
                        fmt_times((fastest or {}).get("time_ratio_fwd_bwd")), r, "vs_fastest_peer.time_ratio_fwd_bwd"
                    ),
                    "mem": _with_verdict(
                        fmt_ratio((leanest or {}).get("memory_ratio_excl_grad")),
                        r,
                        "vs_leanest_peer.memory_ratio_excl_grad",
                    ),
                }
            )
    return out


def _head_header(report: dict) -> list[str]:
    lines = header_lines(report)
    host = report["meta"].get("host") or {}

    def load(key):
        v = host.get(key)
        return ", ".join(f"{x:.2f}" for x in v) if v else "n/a"

    lines.append(f"load:     average (1, 5, 15 min) at start {load('loadavg_start')}; at end {load('loadavg_end')}")
    for case, g in (report.get("gemm") or {}).items():
        if g and g.get("TFLOPs"):
            lines.append(
                f"GEMM:     {case}: hidden_counted ({g['tokens']}x{g['hidden']}) @ W.T ({g['hidden']}x{g['vocab']}) "
                f"{g['time_ms']['median_ms']:.3g} ms, {_sig(g['TFLOPs'])} TFLOP/s"
            )
    return lines


def legend_lines(report: dict) -> list[str]:
    return [
        "time vs naive = row fwd+bwd time / naive eager (linear_loss backend=reference) of the same case and run "
        "(frozen rows: / naive-frozen); below 1 is faster.",
        "rise-grad = peak memory above the inputs during fwd+bwd of everything but the hidden/weight gradients "
        "every row returns (CPU: the allocation events replayed without those buffers; CUDA: the peak minus their "
        "bytes); mem vs naive = row / naive rise-grad.",
        "sched = ours' fused-head schedule (one-pass: the logits gradient is formed while the tile is resident; "
        "two-pass: the backward recomputes every tile).",
        "+ = the gradients are computed in the forward (its fwd includes them, its bwd only scales them).",
        FLOP_MODEL + ".",
        "pass / FAIL / n/a: the target on that figure (listed below); n/a: not measured in this run.",
    ]


def target_lines(report: dict) -> list[str]:
    heading = "Performance targets of the fused head (CPU at fp32 8x512x256x32000; GPU at bf16 8x2048x4096x128256):"
    return verdict_lines(report, heading, _fmt_target_value, "head")


def _fmt_target_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    if t["metric"] == "pct_of_gemm":
        return f"{v:.1f}%"
    if t["metric"] == "rise_excl_grad_bytes":
        return f"{fmt_mib(v)} MiB"
    return fmt_times(v)


def _spans(keys: list[str], cells: dict, status_key: str) -> bool:
    """A row whose status message (skipped, oom, error) runs on from ``status_key`` to the end."""
    return all(cells.get(k) is None for k in keys[keys.index(status_key) + 1 :])


def _table(cols, rows: list[dict], status_key: str) -> list[str]:
    keys = [k for _, k in cols]
    index = keys.index(status_key)
    widths = {key: len(title) for title, key in cols}
    for cells in rows:
        span = _spans(keys, cells, status_key)
        for key in keys:
            if not (span and key == status_key):
                widths[key] = max(widths[key], len(cells.get(key) or "-"))
    lines = ["  ".join(title.ljust(widths[key]) for title, key in cols).rstrip()]
    lines.append("  ".join("-" * widths[key] for key in keys))
    prev = None
    for cells in rows:
        case = cells["case"] if cells["case"] != prev else ""
        prev = cells["case"]
        first = [case.ljust(widths["case"])]
        if _spans(keys, cells, status_key):
            head = [(cells.get(k) or "").ljust(widths[k]) for k in keys[1:index]]
            lines.append("  ".join(first + head + [cells.get(status_key) or ""]).rstrip())
        else:
            lines.append("  ".join(first + [(cells.get(k) or "-").ljust(widths[k]) for k in keys[1:]]).rstrip())
    return lines


def format_table(report: dict) -> str:
    lines = _head_header(report) + [""]
    lines += _table(COLUMNS, [row_cells(r) for r in report["results"]], "fwd")
    peers = peer_rows(report)
    if peers:
        lines += ["", "ours vs the other fused heads (same case, same run; below 1: ours is faster / leaner):", ""]
        lines += _table(PEER_COLUMNS, peers, "peer_ms")
    lines += [""] + legend_lines(report) + target_lines(report) + note_lines(report)
    return "\n".join(lines)


def _md_rows(cols, rows: list[dict], status_key: str) -> list[str]:
    keys = [k for _, k in cols]
    index = keys.index(status_key)
    out = ["| " + " | ".join(title for title, _ in cols) + " |", "|" + "---|" * len(cols)]
    for cells in rows:
        if _spans(keys, cells, status_key):
            values = [cells.get(k) or "" for k in keys[: index + 1]] + [""] * (len(keys) - index - 1)
        else:
            values = [cells.get(k) or "-" for k in keys]
        out.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return out


def format_markdown(report: dict) -> str:
    lines = markdown_intro(report, _head_header(report), title="catdpo-bench --head")
    lines += [""] + _md_rows(COLUMNS, [row_cells(r) for r in report["results"]], "fwd")
    peers = peer_rows(report)
    if peers:
        lines += ["", "## Ours vs the other fused heads", ""]
        lines += ["Same case, same run; below 1: ours is faster / leaner.", ""]
        lines += _md_rows(PEER_COLUMNS, peers, "peer_ms")
    lines += [""] + [f"- {line}" for line in legend_lines(report)]

    def target_cells(r: dict, t: dict) -> list[str]:
        case = case_label(r, "head") + (" (design shape)" if t["at_design_shape"] else "")
        value = _fmt_target_value(t)
        return [case, r["label"], t["text"], t.get("compared_with") or "-", value, verdict(t["ok"])]

    titles = ("case", "variant", "target", "compared with", "measured", "verdict")
    lines += markdown_targets(report, "Performance targets (fused head)", titles, target_cells)
    return "\n".join(lines + note_lines(report, markdown=True)) + "\n"


# ------------------------------------------------------------------ plot
def write_plot(report: dict, path) -> str | None:
    """One panel row per group: bars per row for a single case, lines against T for a T sweep."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    results = report["results"]
    groups = list(dict.fromkeys(r["group"] for r in results))
    if not any(r["status"] == "ok" for r in results):
        return "nothing to plot (no successful rows)"
    fig, axes = plt.subplots(len(groups), 3, figsize=(16, 4.8 * len(groups)), squeeze=False)
    budget = (report.get("settings") or {}).get("budget_bytes")
    for row, group in enumerate(groups):
        rows = [r for r in results if r["group"] == group]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        if len(cases) > 1 and len({(r["shape"]["rows"], r["shape"]["hidden"], r["shape"]["vocab"]) for r in rows}) == 1:
            _lines_vs_tokens(axes[row], rows, budget)
        else:
            _bars(axes[row], rows, cases, budget)
        axes[row][0].set_title(f"fwd+bwd time [{group}]")
        axes[row][1].set_title("peak rise above inputs, excl. returned grads")
        axes[row][2].set_title("achieved TFLOP/s, % of the measured GEMM")
    save_figure(plt, fig, report, path, title="catdpo-bench --head")
    return None


def _metrics(r: dict) -> tuple:
    if r["status"] != "ok":
        return None, None, None
    t = (r.get("time_ms") or {}).get("fwd_bwd") or {}
    rise = (r.get("memory") or {}).get("fwd_bwd_rise_excl_grad_bytes")
    pct = (r.get("flops") or {}).get("pct_of_gemm")
    return t.get("median_ms"), None if rise is None else rise / MiB, pct


def _bars(axes, rows: list[dict], cases: list[str], budget) -> None:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / max(1, len(cases))
    for j, case in enumerate(cases):
        by_label = {r["label"]: r for r in rows if r["case"] == case}
        xs = [i + (j - (len(cases) - 1) / 2) * width for i in range(len(labels))]
        for k, ax in enumerate(axes):
            values = [(_metrics(by_label[lab])[k] if lab in by_label else None) for lab in labels]
            heights = [v if v is not None else 0.0 for v in values]
            colors = [ROLE_COLORS.get(by_label[lab].get("role"), "C0") if lab in by_label else "C0" for lab in labels]
            if len(cases) > 1:
                colors = None  # one colour per case
            bars = ax.bar(xs, heights, width=width * 0.9, label=case, color=colors)
            for bar, lab, v in zip(bars, labels, values):
                if v is None and lab in by_label:
                    status = by_label[lab]["status"]
                    ax.annotate(
                        status if status != "ok" else "n/a",
                        (bar.get_x() + bar.get_width() / 2, 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        rotation=90,
                        xytext=(0, 3),
                        textcoords="offset points",
                    )
    for k, ax in enumerate(axes):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(("ms (median)", "MiB", "% of GEMM")[k])
        if k == 1:
            ax.set_yscale("symlog", linthresh=1.0)
            if budget:  # labelled on the line itself: a legend box would hide the bars behind it
                line = budget / MiB + 64
                ax.axhline(line, color="gray", ls="--", lw=1)
                ax.annotate(
                    "tile budget + 64 MiB",
                    (1, line),
                    xycoords=("axes fraction", "data"),
                    xytext=(-3, 3),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color="gray",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1),
                )
        ax.grid(True, axis="y", alpha=0.3)
        if k == 0:
            if len(cases) == 1:  # bars coloured by role: say which colour is which, once
                from matplotlib.patches import Patch

                handles = [Patch(color=c, label=role) for role, c in ROLE_COLORS.items()]
                ax.legend(handles=handles, fontsize=7, loc="best")
            else:
                ax.legend(fontsize=7, loc="best")


def _lines_vs_tokens(axes, rows: list[dict], budget) -> None:
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["shape"]["tokens"], r) for r in rows if r["label"] == label)
        xs = [x for x, _ in pts]
        for k, ax in enumerate(axes):
            ys = [_metrics(r)[k] for _, r in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", label=label)
    for k, ax in enumerate(axes):
        ax.set_xlabel("T")
        ax.set_xscale("log", base=2)
        ax.set_ylabel(("ms (median)", "MiB", "% of GEMM")[k])
        if k < 2:
            ax.set_yscale("log")
        if k == 1 and budget:
            ax.axhline(budget / MiB + 64, color="gray", ls="--", lw=1, label="tile budget + 64 MiB")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


# ------------------------------------------------------------------ summary
def digest(data: dict, name: str = "") -> list[str]:
    """The head section of ``python -m catdpo_kernels.bench.summary``."""
    from .head_targets import HEAD_TARGET_SHAPE

    meta = data["meta"]
    commit = (meta.get("git", {}).get("commit") or "unknown")[:12]
    host = meta.get("host") or {}
    lines = [
        f"### {name or 'catdpo-bench --head'}: {meta['device_label']}",
        "",
        f"{meta['date_utc']}, git {commit}, torch {meta['versions']['torch']}, "
        f"load average start {host.get('loadavg_start')} end {host.get('loadavg_end')}",
    ]
    results = data.get("results") or []
    if not results:
        return lines + ["", "no results"]
    design = HEAD_TARGET_SHAPE.get(meta["device"]["type"])
    for group in dict.fromkeys(r["group"] for r in results):
        rows = [r for r in results if r["group"] == group]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        if group == "head":
            wanted = f"{design[0]} {design[1]}" if design else None
            cases = [wanted] if wanted in cases else cases[:1]
        for case in cases:
            lines += [
                "",
                f"fused head, case **{case}**{'' if group == 'head' else f' [{group}]'} "
                "(ratios against the naive row of this run):",
                "",
                "| variant | fwd+bwd ms | time vs naive | rise-grad MiB | mem vs naive | TFLOP/s | % GEMM |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                if r["case"] != case:
                    continue
                cells = row_cells(r)
                if r["status"] != "ok":
                    lines.append(f"| {r['label']} | {cells['fwd']} | | | | | |")
                    continue
                lines.append(
                    f"| {r['label']} | {cells['fwd_bwd']} | {cells['time_ratio']} | {cells['rise_excl']} | "
                    f"{cells['mem_ratio']} | {cells['tflops']} | {cells['pct_gemm']} |"
                )
            verdicts = [(r["label"], t) for r in rows if r["case"] == case for t in r.get("targets") or []]
            if verdicts:
                lines += ["", "Targets:"]
                lines += [
                    f"- {label}: {t['text']}"
                    + (f" (vs {t['compared_with']})" if t.get("compared_with") else "")
                    + f": {_fmt_target_value(t)} **{verdict(t['ok'])}**"
                    for label, t in verdicts
                ]
    notes = data.get("notes") or []
    if notes:
        lines += ["", "notes: " + " | ".join(notes)]
    return lines
