"""A short markdown digest of ``catdpo-bench --json`` files: the main case and its targets.

    python -m catdpo_kernels.bench.summary bench.json [configs.json ...] [--out summary.md]

For each file: the device and date, the rows of the main case (the docs/design.md
shape for that device when the run has it, else the first case) with their
ratios against the naive row of that same run, the §5 verdicts, and for runs
with several triton configs the configs ranked by fwd+bwd time. A ``--head`` run
gets the fused-head section instead: its main case (or every T of a
``--scaling`` run) with the ratios against naive, TFLOP/s, % of the measured
GEMM and the verdicts of the fused-head targets. Used by
``benchmarks/gpu_check.sh`` and for quoting numbers in the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import fmt_ms, fmt_ratio, fmt_value, fmt_x, verdict
from .targets import TARGET_SHAPE


def main_case(data: dict) -> str | None:
    cases = [r["case"] for r in data.get("results", []) if r.get("group") == "logits"]
    if not cases:
        return None
    design = TARGET_SHAPE.get(data["meta"]["device"]["type"])
    wanted = f"{design[0]} {design[1]}" if design else None
    return wanted if wanted in cases else cases[0]


def digest(data: dict, name: str = "") -> list[str]:
    if (data.get("settings") or {}).get("mode") == "head":
        from .head_report import digest as head_digest

        return head_digest(data, name)
    meta = data["meta"]
    commit = (meta.get("git", {}).get("commit") or "unknown")[:12]
    lines = [
        f"### {name or 'catdpo-bench'}: {meta['device_label']}",
        "",
        f"{meta['date_utc']}, git {commit}, torch {meta['versions']['torch']}, triton {meta['versions'].get('triton')}",
    ]
    case = main_case(data)
    if case is None:
        return lines + ["", "no results"]
    rows = [r for r in data["results"] if r["case"] == case and r["group"] == "logits"]
    lines += [
        "",
        f"main case **{case}** (ratios against the naive eager row of this run):",
        "",
        "| variant | fwd+bwd ms | speed-up | vs compiled | mem ratio (excl. grad) | GB/s | % copy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r.get('note') or ''} | | | | | |")
            continue
        ratios, bw = r.get("ratios") or {}, r.get("bandwidth") or {}
        gpu = meta["device"]["type"] == "cuda"  # GB/s is shown for GPU runs only, as in the table
        gbps = (bw.get("GBps") or {}).get("fwd_bwd") if gpu else None
        pct = (bw.get("pct_of_copy") or {}).get("fwd_bwd") if gpu else None
        lines.append(
            f"| {r['label']} | {fmt_ms(r['time_ms'].get('fwd_bwd'))} | {fmt_x(ratios.get('speedup_fwd_bwd'))} | "
            f"{fmt_x(ratios.get('speedup_vs_compiled_fwd_bwd'))} | {fmt_ratio(ratios.get('memory_ratio_excl_grad'))} | "
            f"{'-' if gbps is None else f'{gbps:.0f}'} | {'-' if pct is None else f'{pct:.1f}%'} |"
        )
    verdicts = [(r["label"], t) for r in rows for t in r.get("targets") or []]
    if verdicts:
        lines += ["", "Performance targets (docs/design.md):"]
        lines += [
            f"- {label}: {t['text']}: {fmt_value(t['metric'], t['value'])} **{verdict(t['ok'])}**"
            for label, t in verdicts
        ]
    triton = [
        r
        for r in rows
        if r["kind"] == "triton" and not r.get("inplace") and r["status"] == "ok" and r["time_ms"].get("fwd_bwd")
    ]
    if len(triton) > 1:
        triton.sort(key=lambda r: r["time_ms"]["fwd_bwd"]["median_ms"])
        lines += ["", "triton configs by fwd+bwd time:"]
        for r in triton:
            eff = r.get("effective_triton_config") or {}
            lines.append(
                f"- {r['label']} (BLOCK_V={eff.get('BLOCK_V')}, num_warps={eff.get('num_warps')}): "
                f"{fmt_ms(r['time_ms']['fwd_bwd'])} ms"
            )
    notes = data.get("notes") or []
    if notes:
        lines += ["", "notes: " + " | ".join(notes)]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m catdpo_kernels.bench.summary", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="catdpo-bench --json outputs")
    p.add_argument("--out", help="also write the digest to this file")
    args = p.parse_args(argv)
    lines: list[str] = []
    status = 0
    for path in args.files:
        try:
            data = json.loads(Path(path).read_text())
            lines += digest(data, Path(path).name) + [""]
        except (OSError, ValueError, KeyError) as exc:
            lines += [f"### {path}", "", f"unreadable: {type(exc).__name__}: {exc}", ""]
            status = 1
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
