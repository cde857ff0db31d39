"""Ratios against the naive baseline of the same run, bandwidth, and the performance targets.

Every ratio compares two rows of one case (same shape, dtype, input group) from
one run: ``speedup = naive time / variant time`` and
``memory ratio = variant rise / naive rise``, where *rise* is the peak memory
above what was allocated before the call (the inputs). The ``excl_grad``
figures subtract the gradient that backward returns (a new ``(2B, T, V)``
buffer in the logits dtype, or nothing with ``inplace_backward``), because
every method has to produce it.
"""

from __future__ import annotations

# docs/design.md, "Performance model". The GPU figures are defined at bf16, 2B=8, T=2048, V=128256 on an
# H100/H200; the tool shows them next to every row they apply to.
TARGET_SHAPE = {"cuda": ("8x2048x128256", "bf16"), "cpu": ("8x512x32000", "fp32")}

TARGETS = (
    # id, applies to (device type, variant kind or "*", inplace only), metric, op, threshold, text
    ("speedup_vs_naive", ("cuda", "triton", False), "speedup_fwd_bwd", ">=", 4.0, "fwd+bwd vs naive eager >= 4x"),
    (
        "speedup_vs_compiled",
        ("cuda", "triton", False),
        "speedup_vs_compiled_fwd_bwd",
        ">=",
        2.0,
        "fwd+bwd vs compiled naive >= 2x",
    ),
    ("bandwidth", ("cuda", "triton", False), "pct_of_copy_fwd_bwd", ">=", 70.0, "bandwidth >= 70% of copy"),
    (
        "memory_vs_naive",
        ("cuda", "triton", False),
        "memory_ratio_excl_grad",
        "<=",
        0.02,
        "peak above inputs <= 2% of naive",
    ),
    ("inplace_no_alloc", ("*", "*", True), "rise_fraction_of_logits", "<", 0.01, "inplace: no (2B,T,V) allocation"),
    ("cpu_memory", ("cpu", "torch", False), "memory_ratio_excl_grad", "<=", 0.1, "memory (excl. grad) <= 0.1x naive"),
    ("cpu_time", ("cpu", "torch", False), "time_ratio_fwd_bwd", "<=", 1.0, "fwd+bwd time <= 1.0x naive"),
)

MODES = ("fwd", "bwd", "fwd_bwd")


def case_key(result: dict) -> tuple:
    """The rows compared with each other: one case (shape, dtype) and input group of one run."""
    return (result["case"], result["group"])


def median_ms(result: dict | None, mode: str, stat: str = "median_ms"):
    """The median time of ``mode`` (or another of its figures: ``stat="min_ms"``); None for a missing row or mode."""
    t = ((result or {}).get("time_ms") or {}).get(mode)
    return None if t is None else t.get(stat)


def div(a, b):
    """``a / b``, None when either is missing or ``b`` is 0 (a ratio that was not measured)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdict_entry(tid, text, metric, op, threshold, value, *, at_design_shape: bool, **extra) -> dict:
    """One target's record in a row's ``targets``: ``ok`` is None when the figure was not measured;
    ``extra`` fields (the head mode's ``compared_with``) come before ``at_design_shape``."""
    ok = None
    if value is not None:
        ok = value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold
    entry = {"id": tid, "text": text, "metric": metric, "op": op, "threshold": threshold, "value": value, "ok": ok}
    return {**entry, **extra, "at_design_shape": at_design_shape}


def counted_fraction(result: dict) -> float:
    """The share of tokens the kernels score: every row's first ``PROMPT_FRACTION`` is a masked prompt."""
    from .cases import PROMPT_FRACTION

    tokens = result["shape"]["tokens"]
    return (tokens - int(tokens * PROMPT_FRACTION)) / tokens


def traffic_bytes(result: dict) -> dict:
    """The HBM traffic each mode really needs (docs/design.md, "Performance model"): the forward reads
    the policy and reference logits of the *counted* tokens (a masked token's logits are never read),
    the backward reads the counted policy logits again and writes the whole gradient (zeros included)."""
    mem = result.get("memory") or {}
    logits = mem.get("logits_bytes")
    if not logits or result["group"] != "logits":
        return {}
    f = counted_fraction(result)
    return {"fwd": 2 * f * logits, "bwd": (1 + f) * logits, "fwd_bwd": (1 + 3 * f) * logits}


def annotate(results: list[dict], *, device_type: str, copy_gbps: float | None) -> None:
    """Fill ``ratios``, ``bandwidth`` and ``targets`` of every ok result, in place."""
    by_case: dict[tuple, list[dict]] = {}
    for r in results:
        by_case.setdefault(case_key(r), []).append(r)
    for rows in by_case.values():
        base = next((r for r in rows if r.get("baseline") and r["status"] == "ok"), None)
        compiled = next((r for r in rows if r["kind"] == "compiled" and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] != "ok":
                r["ratios"], r["bandwidth"], r["targets"] = {}, {}, []
                continue
            r["ratios"] = _ratios(r, base, compiled)
            r["bandwidth"] = _bandwidth(r, copy_gbps)
            r["targets"] = _targets(r, device_type)


def _ratios(r: dict, base: dict | None, compiled: dict | None) -> dict:
    out = {"baseline": base["label"] if base else None}
    for mode in MODES:
        out[f"speedup_{mode}"] = div(median_ms(base, mode), median_ms(r, mode)) if base else None
    out["time_ratio_fwd_bwd"] = div(median_ms(r, "fwd_bwd"), median_ms(base, "fwd_bwd")) if base else None
    out["speedup_vs_compiled_fwd_bwd"] = (
        div(median_ms(compiled, "fwd_bwd"), median_ms(r, "fwd_bwd")) if compiled and compiled is not r else None
    )
    mem, base_mem = r.get("memory") or {}, (base or {}).get("memory") or {}
    out["memory_ratio_excl_grad"] = div(
        mem.get("fwd_bwd_rise_excl_grad_bytes"), base_mem.get("fwd_bwd_rise_excl_grad_bytes")
    )
    out["memory_ratio"] = div(mem.get("fwd_bwd_rise_bytes"), base_mem.get("fwd_bwd_rise_bytes"))
    out["forward_memory_ratio"] = div(mem.get("fwd_rise_bytes"), base_mem.get("fwd_rise_bytes"))
    out["rise_fraction_of_logits"] = div(mem.get("fwd_bwd_rise_bytes"), mem.get("logits_bytes"))
    return out


def _bandwidth(r: dict, copy_gbps: float | None) -> dict:
    traffic = traffic_bytes(r)
    if not traffic:
        return {}
    out = {"bytes": traffic, "GBps": {}, "pct_of_copy": {}, "copy_GBps": copy_gbps}
    for mode, nbytes in traffic.items():
        ms = median_ms(r, mode)
        gbps = None if not ms else nbytes / (ms * 1e-3) / 1e9
        out["GBps"][mode] = gbps
        out["pct_of_copy"][mode] = None if gbps is None or not copy_gbps else 100.0 * gbps / copy_gbps
    return out


def metric_value(r: dict, metric: str):
    if metric == "pct_of_copy_fwd_bwd":
        return ((r.get("bandwidth") or {}).get("pct_of_copy") or {}).get("fwd_bwd")
    return (r.get("ratios") or {}).get(metric)


def _applies(spec: tuple, r: dict, device_type: str) -> bool:
    dev, kind, inplace_only = spec
    if r["group"] != "logits":
        return False
    if dev != "*" and dev != device_type:
        return False
    if kind != "*" and kind != r["kind"]:
        return False
    return bool(r.get("inplace")) if inplace_only else True


def _targets(r: dict, device_type: str) -> list[dict]:
    out = []
    target_shape = TARGET_SHAPE.get(device_type)
    for tid, spec, metric, op, threshold, text in TARGETS:
        if not _applies(spec, r, device_type):
            continue
        at_design_shape = target_shape == (r["shape_str"], r["dtype"])
        out.append(
            verdict_entry(tid, text, metric, op, threshold, metric_value(r, metric), at_design_shape=at_design_shape)
        )
    return out
