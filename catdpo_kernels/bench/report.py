"""Output: terminal table, JSON, markdown, PNG plot.

All four are produced from the same ``report`` dict (``meta``, ``settings``,
``notes``, ``copy_bandwidth``, ``results``), so what the table shows is what the
JSON records. Files are written atomically (temp file + rename), so a run that
is killed part-way leaves the last complete version.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

SCHEMA = "catdpo-bench/1"
MiB = 2**20


def public(result: dict) -> dict:
    """A result without the runner's private (non-JSON) keys."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def to_json_dict(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k != "results"}
    out["schema"] = SCHEMA
    out["results"] = [public(r) for r in report["results"]]
    return out


def _atomic_write(path, text: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(report: dict, path) -> None:
    _atomic_write(path, json.dumps(to_json_dict(report), indent=2, sort_keys=False, default=str) + "\n")


# ------------------------------------------------------------- formatting
def fmt_ms(t: dict | None) -> str:
    if not t:
        return "-"
    v = t["median_ms"]
    s = f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return s + ("*" if t.get("derived") else "")


def fmt_x(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def fmt_ratio(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    v = nbytes / MiB
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_value(metric: str, v) -> str:
    if v is None:
        return "n/a"
    if metric.startswith("speedup"):
        return fmt_x(v)
    if metric.startswith("pct"):
        return f"{v:.1f}%"
    return fmt_ratio(v)


def verdict(ok) -> str:
    return "n/a" if ok is None else "pass" if ok else "FAIL"


def show_bandwidth(report: dict) -> bool:
    return report["meta"]["device"]["type"] == "cuda"


COLUMNS = (
    ("case", "case"),
    ("variant", "variant"),
    ("fwd ms", "fwd"),
    ("bwd ms", "bwd"),
    ("fwd+bwd ms", "fwd_bwd"),
    ("speed-up", "speedup"),
    ("rise MiB", "rise"),
    ("rise-grad MiB", "rise_excl"),
    ("mem ratio", "mem_ratio"),
)
BW_COLUMNS = (("GB/s", "gbps"), ("% copy", "pct"))


def case_label(r: dict, main_group: str = "logits") -> str:
    """A row's case, with its input group when that is not the mode's main one."""
    return r["case"] + ("" if r["group"] == main_group else f" [{r['group']}]")


def row_cells(r: dict) -> dict:
    cells = {"case": case_label(r), "variant": r["label"]}
    if r["status"] != "ok":
        cells["fwd"] = f"{r['status']}: {r.get('note') or ''}"
        return cells
    t, mem, ratios, bw = r["time_ms"], r["memory"], r.get("ratios", {}), r.get("bandwidth", {})
    cells.update(
        fwd=fmt_ms(t.get("fwd")),
        bwd=fmt_ms(t.get("bwd")),
        fwd_bwd=fmt_ms(t.get("fwd_bwd")),
        speedup=fmt_x(ratios.get("speedup_fwd_bwd")),
        rise=fmt_mib(mem.get("fwd_bwd_rise_bytes")),
        rise_excl=fmt_mib(mem.get("fwd_bwd_rise_excl_grad_bytes")),
        mem_ratio=fmt_ratio(ratios.get("memory_ratio_excl_grad")),
    )
    gbps = (bw.get("GBps") or {}).get("fwd_bwd")
    pct = (bw.get("pct_of_copy") or {}).get("fwd_bwd")
    cells["gbps"] = "-" if gbps is None else f"{gbps:.0f}"
    cells["pct"] = "-" if pct is None else f"{pct:.1f}%"
    return cells


def _columns(report: dict):
    return COLUMNS + (BW_COLUMNS if show_bandwidth(report) else ())


def header_lines(report: dict) -> list[str]:
    meta, settings = report["meta"], report["settings"]
    v = meta["versions"]
    git = meta.get("git", {})
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"device:   {meta['device_label']}",
        f"date:     {meta['date_utc']}   git {commit}",
        f"versions: python {v['python']}, torch {v['torch']}, triton {v.get('triton')}, "
        f"catdpo_kernels {v.get('catdpo_kernels')}",
        f"loss:     {settings['loss']}; timed runs use check_inputs=False (the value checks sync the host)",
        f"timing:   {settings['timing']}",
        f"memory:   {settings['memory']}",
    ]
    copy = report.get("copy_bandwidth")
    if copy:
        lines.append(f"copy:     {copy['GBps']:.0f} GB/s ({copy.get('method', '')})")
    return lines


def _is_head(report: dict) -> bool:
    return (report.get("settings") or {}).get("mode") == "head"


def format_table(report: dict) -> str:
    if _is_head(report):
        from .head_report import format_table as head_table

        return head_table(report)
    cols = _columns(report)
    rows = [row_cells(r) for r in report["results"]]
    widths = {key: len(title) for title, key in cols}
    for cells in rows:
        for _, key in cols:
            if key == "fwd" and "bwd" not in cells:
                continue  # a status message spans the row
            widths[key] = max(widths[key], len(cells.get(key, "-")))
    lines = header_lines(report) + [""]
    lines.append("  ".join(title.ljust(widths[key]) for title, key in cols).rstrip())
    lines.append("  ".join("-" * widths[key] for _, key in cols))
    prev_case = None
    for _, cells in zip(report["results"], rows):
        case_cell = cells["case"] if cells["case"] != prev_case else ""
        prev_case = cells["case"]
        if "bwd" not in cells:
            lines.append(
                f"{case_cell.ljust(widths['case'])}  {cells['variant'].ljust(widths['variant'])}  {cells['fwd']}"
            )
            continue
        out = [case_cell.ljust(widths["case"])] + [cells.get(key, "-").ljust(widths[key]) for _, key in cols[1:]]
        lines.append("  ".join(out).rstrip())
    lines += [""] + legend_lines(report) + target_lines(report) + note_lines(report)
    return "\n".join(lines)


def note_lines(report: dict, *, markdown: bool = False) -> list[str]:
    """The run's notes (skipped anchors, load, interruptions) at the end of the table or the markdown."""
    notes = report.get("notes") or []
    if not notes:
        return []
    if markdown:
        return ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return ["", "notes:"] + [f"  - {n}" for n in notes]


def legend_lines(report: dict) -> list[str]:
    base = "naive eager (backend=reference) of the same case, same run"
    lines = [
        f"speed-up = {base} time / variant time (fwd+bwd); "
        "mem ratio = variant / naive peak rise, excluding the returned gradient.",
        "rise = peak memory above the inputs during fwd+bwd (the returned gradient included); "
        "rise-grad = rise minus the returned gradient.",
        "* = derived (fwd+bwd minus fwd): an in-place or compiled backward cannot be replayed on its own.",
    ]
    if show_bandwidth(report):
        lines.append(
            "GB/s = (1 + 3f)*2B*T*V*elem_size bytes / fwd+bwd time, f the counted share of tokens "
            "(fwd reads the counted policy+ref logits, bwd reads the counted policy logits and writes "
            "the whole gradient)."
        )
    return lines


def target_lines(report: dict) -> list[str]:
    heading = (
        "Performance targets of docs/design.md "
        "(GPU ones are defined at bf16 8x2048x128256 on H100/H200; CPU ones at fp32 8x512x32000):"
    )
    return verdict_lines(report, heading, lambda t: fmt_value(t["metric"], t["value"]))


def verdict_lines(report: dict, heading: str, value_text, main_group: str = "logits") -> list[str]:
    """The table's last part: a line per row that has targets, each target with its measured value
    (``value_text(target)``) and verdict."""
    rows = [r for r in report["results"] if r.get("targets")]
    if not rows:
        return []
    lines = ["", heading]
    for r in rows:
        parts = [f"{t['text']}: {value_text(t)} {verdict(t['ok'])}" for t in r["targets"]]
        mark = " (design shape)" if any(t["at_design_shape"] for t in r["targets"]) else ""
        lines.append(f"  {case_label(r, main_group)} {r['label']}{mark}: " + "; ".join(parts))
    return lines


# -------------------------------------------------------------- markdown
def format_markdown(report: dict) -> str:
    if _is_head(report):
        from .head_report import format_markdown as head_markdown

        return head_markdown(report)
    cols = _columns(report)
    lines = markdown_intro(report, header_lines(report))
    lines += ["", "| " + " | ".join(title for title, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        cells = row_cells(r)
        if "bwd" not in cells:
            rest = [cells["fwd"]] + [""] * (len(cols) - 3)
            lines.append("| " + " | ".join([cells["case"], cells["variant"]] + rest) + " |")
        else:
            lines.append("| " + " | ".join(cells.get(key, "-") for _, key in cols) + " |")
    lines += [""] + legend_lines(report)

    def target_cells(r: dict, t: dict) -> list[str]:
        case = r["case"] + (" (design shape)" if t["at_design_shape"] else "")
        return [case, r["label"], t["text"], fmt_value(t["metric"], t["value"]), verdict(t["ok"])]

    titles = ("case", "variant", "target", "measured", "verdict")
    lines += markdown_targets(report, "Performance targets (docs/design.md)", titles, target_cells)
    return "\n".join(lines + note_lines(report, markdown=True)) + "\n"


def markdown_intro(report: dict, header: list[str], title: str = "catdpo-bench") -> list[str]:
    """The markdown's title, the header lines as a list, and the command that wrote it (the title's own
    command for a report that recorded none)."""
    argv = report["settings"].get("argv") or title.split()
    lines = [f"# {title}: {report['meta']['device_label']}", "", "Written by `catdpo-bench` (do not edit by hand).", ""]
    lines += [f"- {line.split(':', 1)[0].strip()}: {line.split(':', 1)[1].strip()}" for line in header]
    return lines + [f"- command: `{' '.join(argv)}`"]


def markdown_targets(report: dict, heading: str, titles, cells) -> list[str]:
    """A markdown table of every target of every row that has some; ``cells(row, target)`` gives its cells."""
    rows = [r for r in report["results"] if r.get("targets")]
    if not rows:
        return []
    lines = ["", f"## {heading}", "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(cells(r, t)) + " |" for r in rows for t in r["targets"]]
    return lines


def write_markdown(report: dict, path) -> None:
    _atomic_write(path, format_markdown(report))


# ------------------------------------------------------------------ plot
def write_plot(report: dict, path) -> str | None:
    """Time and memory against V (at the first case's T) and T (at its V); with a single shape, bars per
    variant (one point per line would be lone dots). Returns a note if skipped."""
    if _is_head(report):
        from .head_report import write_plot as head_plot

        return head_plot(report, path)
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    ok = [r for r in report["results"] if r["status"] == "ok" and r["group"] == "logits"]
    if not ok:
        return "nothing to plot (no successful logits-group results)"
    dtypes = [r["dtype"] for r in ok]
    dtype = max(set(dtypes), key=dtypes.count)
    ok = [r for r in ok if r["dtype"] == dtype]
    first = ok[0]["shape"]
    if len({r["case"] for r in ok}) == 1:
        fig = _bar_plot(plt, ok, f"{ok[0]['case']}")
        save_figure(plt, fig, report, path)
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (axis, fixed, fixed_key) in enumerate(
        (("vocab", first["tokens"], "tokens"), ("tokens", first["vocab"], "vocab"))
    ):
        rows_fixed = first["rows"]
        sel = [r for r in ok if r["shape"][fixed_key] == fixed and r["shape"]["rows"] == rows_fixed]
        for label in dict.fromkeys(r["label"] for r in sel):
            pts = sorted((r["shape"][axis], r) for r in sel if r["label"] == label)
            xs = [x for x, _ in pts]
            times = [r["time_ms"].get("fwd_bwd", {}).get("median_ms") for _, r in pts]
            mems = [r["memory"].get("fwd_bwd_rise_excl_grad_bytes") for _, r in pts]
            if any(t is not None for t in times):
                axes[0][col].plot(xs, [t if t is not None else float("nan") for t in times], "o-", label=label)
            if any(m is not None for m in mems):
                axes[1][col].plot(xs, [m / MiB if m is not None else float("nan") for m in mems], "o-", label=label)
        name = {"vocab": "V", "tokens": "T"}[axis]
        other = {"vocab": "V", "tokens": "T"}[fixed_key]
        axes[0][col].set_title(f"fwd+bwd time vs {name} (2B={rows_fixed}, {other}={fixed}, {dtype})")
        axes[1][col].set_title(f"peak rise above inputs, excl. grad, vs {name}")
        axes[0][col].set_ylabel("ms (median)")
        axes[1][col].set_ylabel("MiB")
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xlabel(name)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    save_figure(plt, fig, report, path)
    return None


def _bar_plot(plt, rows: list[dict], case: str):
    """One case: fwd+bwd time and peak rise (excl. grad) per variant, as bars."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = [r["label"] for r in rows]
    times = [(r["time_ms"].get("fwd_bwd") or {}).get("median_ms") for r in rows]
    mems = [r["memory"].get("fwd_bwd_rise_excl_grad_bytes") for r in rows]
    for ax, values, unit, title in (
        (axes[0], times, "ms (median)", f"fwd+bwd time ({case})"),
        (axes[1], [None if m is None else m / MiB for m in mems], "MiB", "peak rise above inputs, excl. grad"),
    ):
        ax.bar(range(len(labels)), [v if v is not None else 0.0 for v in values], color="C0")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    return fig


NO_MATPLOTLIB = "--plot needs matplotlib (pip install matplotlib)"


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (no display needed), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, report: dict, path, title: str = "catdpo-bench") -> None:
    """Titles the figure with the device, date and torch version, then writes it atomically (as the files)."""
    meta = report["meta"]
    busy = (meta.get("host", {}).get("contention") or {}).get("busy_processes")
    under = f", {busy} other busy process{'es' if busy > 1 else ''} (contention mode)" if busy else ""
    fig.suptitle(
        f"{title}: {meta['device_label']}{under}\n{meta['date_utc']}, torch {meta['versions']['torch']}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
