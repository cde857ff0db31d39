"""Ratios, TFLOP/s and the performance targets of the fused-head mode.

Every ratio compares two rows of one case from one run:

- ``time_ratio_<mode>`` = row time / naive time (``naive-frozen`` for a frozen row),
  ``speedup_fwd_bwd`` its inverse;
- ``memory_ratio_excl_grad`` = row / naive peak rise above the inputs, not counting
  the ``hidden``/``weight`` gradients every row returns;
- for our unfrozen rows, ``vs[<peer>]`` holds ours / peer for time and memory,
  and ``vs_fastest_peer`` / ``vs_leanest_peer`` the comparisons with the fastest
  and the leanest peer that ran;
- ``flops``: the GEMMs of the row (``head_cases.FLOP_MODEL``), the achieved
  TFLOP/s over its fwd+bwd time and that as a percentage of the reference GEMM
  ``hidden_counted @ W.T`` measured in the same run.

The targets (ours only; CPU: the torch backend, CUDA: the triton backend):

- CPU: vs naive eager, time <= 0.8x and memory <= 0.1x; vs TRL's fused head,
  time <= 0.8x and memory <= 0.5x; vs Liger, time <= 1.0x and memory <= 0.5x;
  memory <= the default tile budget + 64 MiB at every T (``--scaling``).
- CUDA: vs naive eager, time <= 0.9x and memory <= 0.05x; vs the fastest of
  TRL/Liger/CCE, time <= 0.9x; vs the leanest, memory <= 1.0x; TFLOP/s >= 70%
  of the measured GEMM.

A frozen row (``*-frozen``) is held to the targets against naive (its naive is
``naive-frozen``) and to the budget; the peers run with a trainable head only.
"""

from __future__ import annotations

from .head_cases import PEERS, fused_backend
from .targets import MODES, case_key, div, median_ms, verdict_entry

MiB = 2**20
BUDGET_SLACK_BYTES = 64 * MiB
HEAD_TARGET_SHAPE = {"cpu": ("8x512x256x32000", "fp32"), "cuda": ("8x2048x4096x128256", "bf16")}
# Rows whose loss is the same Cat-DPO loss as naive's (Liger's is plain DPO): their loss value is checked.
LOSS_TOLERANCE = {"fp32": 1e-3, "fp64": 1e-6}
LOSS_TOLERANCE_HALF = 5e-2


def budget_bytes(device_type: str) -> int:
    from ..head import DEFAULT_BUDGET_BYTES

    return DEFAULT_BUDGET_BYTES.get(device_type, DEFAULT_BUDGET_BYTES["cpu"])


def targets_table(device_type: str) -> tuple:
    """``(id, scope, metric, op, threshold, text, compared_with)``; scope ``ours`` (frozen too) or ``main`` (unfrozen,
    in the ``head`` group, where the peers run)."""
    if device_type == "cuda":
        return _vs_naive(0.9, 0.05) + (
            _vs_peer("time", 0.9, "fastest_peer", "the fastest of TRL/Liger/CCE"),
            _vs_peer("memory", 1.0, "leanest_peer", "the leanest of TRL/Liger/CCE"),
            ("tflops_vs_gemm", "main", "pct_of_gemm", ">=", 70.0, "TFLOP/s >= 70% of the measured GEMM", "gemm"),
        )
    budget = budget_bytes(device_type) + BUDGET_SLACK_BYTES
    return _vs_naive(0.8, 0.1) + (
        _vs_peer("time", 0.8, "trl", "TRL fused head", peer="trl-chunked"),
        _vs_peer("memory", 0.5, "trl", "TRL fused head", peer="trl-chunked"),
        _vs_peer("time", 1.0, "liger", "Liger", peer="liger-dpo"),
        _vs_peer("memory", 0.5, "liger", "Liger", peer="liger-dpo"),
        (
            "memory_budget",
            "ours",
            "rise_excl_grad_bytes",
            "<=",
            budget,
            f"memory <= tile budget + 64 MiB ({budget // MiB} MiB)",
            "budget",
        ),
    )


_RATIO = {"time": "time_ratio_fwd_bwd", "memory": "memory_ratio_excl_grad"}


def _vs_naive(time: float, memory: float) -> tuple:
    """The two targets against naive eager (``naive-frozen`` for a frozen row), for every row of ours."""
    return (
        ("time_vs_naive", "ours", _RATIO["time"], "<=", time, f"fwd+bwd time <= {time}x naive eager", "baseline"),
        ("memory_vs_naive", "ours", _RATIO["memory"], "<=", memory, f"memory <= {memory}x naive", "baseline"),
    )


def _vs_peer(kind: str, threshold: float, name: str, text: str, *, peer: str | None = None) -> tuple:
    """``kind`` (time or memory) of ours / a peer at most ``threshold``: the named ``peer`` (its ratio under
    ``vs.<peer>``), or without one the fastest / leanest peer that ran (under ``vs_<name>``)."""
    where, compared = (f"vs.{peer}", peer) if peer else (f"vs_{name}", f"vs_{name}.peer")
    return (
        f"{kind}_vs_{name}",
        "main",
        f"{where}.{_RATIO[kind]}",
        "<=",
        threshold,
        f"{kind} <= {threshold}x {text}",
        compared,
    )


def _min(result: dict | None):
    """The fastest fwd+bwd sample: less sensitive than the median to a busy machine."""
    return median_ms(result, "fwd_bwd", "min_ms")


def _rise(result: dict | None, key: str = "fwd_bwd_rise_excl_grad_bytes"):
    return None if not result else (result.get("memory") or {}).get(key)


def annotate(results: list[dict], *, device_type: str, gemm: dict | None = None) -> None:
    """Fill ``ratios``, ``flops`` (TFLOP/s, % GEMM) and ``targets`` of every row, in place.

    ``gemm`` maps a case name to its reference GEMM (``head_runner.GemmReference.to_dict``).
    """
    gemm = gemm or {}
    by_case: dict[tuple, list[dict]] = {}
    for r in results:
        by_case.setdefault(case_key(r), []).append(r)
    for (case, group), rows in by_case.items():
        ok = [r for r in rows if r["status"] == "ok"]
        naive = next((r for r in ok if r.get("baseline") and not r.get("frozen")), None)
        naive_frozen = next((r for r in ok if r.get("baseline") and r.get("frozen")), None)
        compiled = next((r for r in ok if r.get("role") == "compiled"), None)
        peers = [r for r in rows if r.get("role") == "peer"]
        ref_gemm = gemm.get(case)
        for r in rows:
            if r["status"] != "ok":
                r["ratios"], r["targets"] = {}, []
                continue
            base = naive_frozen if r.get("frozen") else naive
            r["ratios"] = _ratios(r, base, compiled, peers)
            _fill_flops(r, ref_gemm)
            r["targets"] = _targets(r, device_type, group)


def _ratios(r: dict, base: dict | None, compiled: dict | None, peers: list[dict]) -> dict:
    out = {"baseline": base["label"] if base else None}
    for mode in MODES:
        out[f"time_ratio_{mode}"] = div(median_ms(r, mode), median_ms(base, mode))
    out["speedup_fwd_bwd"] = div(median_ms(base, "fwd_bwd"), median_ms(r, "fwd_bwd"))
    out["time_ratio_fwd_bwd_of_min"] = div(_min(r), _min(base))
    out["memory_ratio_excl_grad"] = div(_rise(r), _rise(base))
    out["memory_ratio"] = div(_rise(r, "fwd_bwd_rise_bytes"), _rise(base, "fwd_bwd_rise_bytes"))
    out["forward_memory_ratio"] = div(_rise(r, "fwd_rise_bytes"), _rise(base, "fwd_rise_bytes"))
    if base is not None and r.get("loss_value") is not None and r["label"] != "liger-dpo":
        ref = base.get("loss_value")
        out["loss_rel_diff_vs_naive"] = None if not ref else abs(r["loss_value"] - ref) / abs(ref)
    if r.get("frozen"):
        return out
    if compiled is not None and compiled is not r:
        out["time_ratio_vs_compiled_fwd_bwd"] = div(median_ms(r, "fwd_bwd"), median_ms(compiled, "fwd_bwd"))
    if r.get("role") == "ours" and peers:
        vs = {}
        for p in peers:
            vs[p["label"]] = {
                "status": p["status"],
                "time_ratio_fwd_bwd": div(median_ms(r, "fwd_bwd"), median_ms(p, "fwd_bwd")),
                "time_ratio_fwd_bwd_of_min": div(_min(r), _min(p)),
                "memory_ratio_excl_grad": div(_rise(r), _rise(p)),
            }
        out["vs"] = vs
        ran = [p for p in peers if p["status"] == "ok"]
        timed = [p for p in ran if median_ms(p, "fwd_bwd")]
        if timed:
            fastest = min(timed, key=lambda p: median_ms(p, "fwd_bwd"))
            out["vs_fastest_peer"] = {
                "peer": fastest["label"],
                "time_ratio_fwd_bwd": vs[fastest["label"]]["time_ratio_fwd_bwd"],
            }
        measured = [p for p in ran if _rise(p) is not None]
        if measured:
            leanest = min(measured, key=_rise)
            out["vs_leanest_peer"] = {
                "peer": leanest["label"],
                "memory_ratio_excl_grad": vs[leanest["label"]]["memory_ratio_excl_grad"],
            }
    return out


def _fill_flops(r: dict, ref_gemm: dict | None) -> None:
    flops = r.get("flops")
    if not flops:
        return
    ms = median_ms(r, "fwd_bwd")
    flops["TFLOPs"] = None if not ms else flops["flops"] / (ms * 1e-3) / 1e12
    rate = (ref_gemm or {}).get("TFLOPs")
    flops["gemm_TFLOPs"] = rate
    flops["pct_of_gemm"] = None if flops["TFLOPs"] is None or not rate else 100.0 * flops["TFLOPs"] / rate


def metric_value(r: dict, metric: str):
    if metric == "pct_of_gemm":
        return (r.get("flops") or {}).get("pct_of_gemm")
    if metric == "rise_excl_grad_bytes":
        return _rise(r)
    value = r.get("ratios") or {}
    for part in _split(metric):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _split(metric: str) -> list[str]:
    # peer labels contain '-' but no '.'
    return metric.split(".")


def _applies(scope: str, r: dict, device_type: str, group: str) -> bool:
    if r.get("role") != "ours" or r.get("backend") != fused_backend(device_type):
        return False
    if scope == "main":
        return not r.get("frozen") and group == "head"
    return True


def _targets(r: dict, device_type: str, group: str) -> list[dict]:
    target_shape = HEAD_TARGET_SHAPE.get(device_type)
    out = []
    for tid, scope, metric, op, threshold, text, compared in targets_table(device_type):
        if not _applies(scope, r, device_type, group):
            continue
        if compared == "baseline":
            compared = (r.get("ratios") or {}).get("baseline")
        elif "." in compared:
            compared = metric_value(r, compared)
        value = metric_value(r, metric)
        at_design_shape = target_shape == (r["shape_str"], r["dtype"])
        entry = verdict_entry(
            tid, text, metric, op, threshold, value, compared_with=compared, at_design_shape=at_design_shape
        )
        out.append(entry)
    return out


def loss_check(results: list[dict]) -> list[str]:
    """Notes for rows whose loss differs from naive's by more than the tolerance of their dtype."""
    notes = []
    for r in results:
        diff = (r.get("ratios") or {}).get("loss_rel_diff_vs_naive")
        if diff is None:
            continue
        tol = LOSS_TOLERANCE.get(r["dtype"], LOSS_TOLERANCE_HALF)
        if diff > tol:
            notes.append(
                f"{r['case']} {r['label']}: loss {r['loss_value']:.6g} differs from naive's by {diff:.2e} "
                f"(relative; tolerance {tol:g})"
            )
    return notes


NOISY_SPREAD = 1.5  # p80 / p20 of the fwd+bwd samples above which a row's timing is called noisy


def noise_notes(results: list[dict]) -> list[str]:
    """A note naming the rows whose fwd+bwd samples spread widely (a busy machine), with the ratios of the
    fastest samples next to the medians'."""
    noisy = []
    for r in results:
        t = (r.get("time_ms") or {}).get("fwd_bwd") or {}
        if t.get("runs", 0) >= 3 and t.get("p20_ms") and t["p80_ms"] / t["p20_ms"] > NOISY_SPREAD:
            noisy.append(f"{r['label']} {t['p80_ms'] / t['p20_ms']:.1f}x")
    if not noisy:
        return []
    text = (
        f"noisy timings (fwd+bwd p80/p20 above {NOISY_SPREAD}x): {', '.join(noisy)}; the figures are medians, "
        "ratios of the fastest samples (min) for comparison:"
    )
    parts = []
    for r in results:
        ratios = r.get("ratios") or {}
        if r.get("role") != "ours" or ratios.get("time_ratio_fwd_bwd_of_min") is None:
            continue
        items = [f"vs {ratios.get('baseline')} {ratios['time_ratio_fwd_bwd_of_min']:.2f}x"]
        for peer, v in (ratios.get("vs") or {}).items():
            if v.get("time_ratio_fwd_bwd_of_min") is not None:
                items.append(f"vs {peer} {v['time_ratio_fwd_bwd_of_min']:.2f}x")
        parts.append(f"{r['case']} {r['label']}: " + ", ".join(items))
    return [text + " " + "; ".join(parts)] if parts else [text]


__all__ = ["PEERS", "annotate", "budget_bytes", "loss_check", "metric_value", "noise_notes", "targets_table"]
