"""Smoke tests of ``catdpo-bench`` on CPU: a tiny sweep, its JSON / markdown / plot, and the ratio logic.

The numbers themselves are not checked (timings are machine noise at this size);
the tests check that every field is there, that the ratios are computed against
the naive row of the same run, and that GPU-only figures (bandwidth, the targets of
docs/design.md, "Performance model") come out right from synthetic rows.
"""

import json
import math

import pytest

from catdpo_kernels.bench import cases, cli, main
from catdpo_kernels.bench.summary import main as summary_main
from catdpo_kernels.bench.targets import annotate


def _run(tmp_path, capsys, *extra):
    paths = {"json": tmp_path / "r.json", "markdown": tmp_path / "r.md", "plot": tmp_path / "r.png"}
    argv = [
        "--device",
        "cpu",
        "--shapes",
        "2x8x64",
        "--dtypes",
        "fp32",
        "--backends",
        "reference,torch,triton",
        "--inplace",
        "--repeats",
        "1",
        "--no-progress",
    ]
    for flag, path in paths.items():
        argv += [f"--{flag}", str(path)]
    rc = main(argv + list(extra))
    return rc, json.loads(paths["json"].read_text()), paths, capsys.readouterr().out


def test_cli_smoke_json_ratios_table_markdown_plot(tmp_path, capsys):
    rc, data, paths, out = _run(tmp_path, capsys, "--save-results", str(tmp_path / "saved"))
    assert rc == 0

    assert data["schema"] == "catdpo-bench/1"
    meta = data["meta"]
    assert meta["device"]["type"] == "cpu" and meta["device_label"]
    assert meta["date_utc"] and meta["versions"]["torch"] and meta["versions"]["python"]
    assert "commit" in meta["git"]
    assert data["settings"]["check_inputs"] is False
    assert data["settings"]["shapes"] == ["2x8x64"]

    rows = {r["label"]: r for r in data["results"]}
    assert list(rows) == ["reference", "torch", "triton", "torch-inplace", "triton-inplace"]
    assert rows["triton"]["status"] == "skipped" and "never benchmarked" in rows["triton"]["note"]
    ref = rows["reference"]
    assert ref["baseline"] is True
    for label in ("reference", "torch", "torch-inplace"):
        r = rows[label]
        assert r["status"] == "ok", r
        assert r["case"] == "2x8x64 fp32" and r["dtype"] == "fp32"
        assert r["shape"] == {"rows": 2, "tokens": 8, "vocab": 64}
        for mode in ("fwd", "bwd", "fwd_bwd"):
            assert r["time_ms"][mode]["median_ms"] > 0
        mem = r["memory"]
        keys = ("input_bytes", "logits_bytes", "grad_bytes", "fwd_rise_bytes", "fwd_bwd_rise_bytes")
        for key in (*keys, "fwd_bwd_rise_excl_grad_bytes"):
            assert mem[key] >= 0, key
        assert mem["logits_bytes"] == 2 * 8 * 64 * 4
        # Every ratio is against the naive row of this very run.
        ratios = r["ratios"]
        assert ratios["baseline"] == "reference"
        for mode in ("fwd", "bwd", "fwd_bwd"):
            expect = ref["time_ms"][mode]["median_ms"] / r["time_ms"][mode]["median_ms"]
            assert math.isclose(ratios[f"speedup_{mode}"], expect, rel_tol=1e-12)
        expect = mem["fwd_bwd_rise_excl_grad_bytes"] / ref["memory"]["fwd_bwd_rise_excl_grad_bytes"]
        assert math.isclose(ratios["memory_ratio_excl_grad"], expect, rel_tol=1e-12)
    assert rows["reference"]["ratios"]["speedup_fwd_bwd"] == 1.0
    # The out-of-place gradient is a new (2B, T, V) buffer; the in-place one aliases the logits.
    assert rows["torch"]["memory"]["grad_bytes"] == 2 * 8 * 64 * 4
    assert rows["torch-inplace"]["memory"]["grad_bytes"] == 0
    assert rows["torch-inplace"]["time_ms"]["bwd"]["derived"] is True
    assert {t["id"] for t in rows["torch"]["targets"]} == {"cpu_memory", "cpu_time"}
    assert "inplace_no_alloc" in {t["id"] for t in rows["torch-inplace"]["targets"]}

    for text in ("fwd+bwd ms", "speed-up", "mem ratio", "reference", "torch-inplace", "check_inputs=False", "skipped"):
        assert text in out, text
    md = paths["markdown"].read_text()
    assert "| case | variant |" in md and "2x8x64 fp32" in md and meta["device_label"] in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --save-results: the same JSON and markdown under device-stamped names.
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert len(saved) == 2 and saved[0].startswith("cpu-") and saved[0].endswith(".json") and saved[1].endswith(".md")
    assert json.loads((tmp_path / "saved" / saved[0]).read_text())["results"] == data["results"]
    # The digest gpu_check.sh prints.
    assert summary_main([str(paths["json"])]) == 0
    digest = capsys.readouterr().out
    assert "main case **2x8x64 fp32**" in digest and "| torch |" in digest


def test_cli_sigterm_keeps_partial_results(tmp_path, capsys, monkeypatch):
    real = cases._loss_forward

    def forward(backend, inplace=False):
        if backend == "torch":
            raise cli._Interrupted("signal 15")  # what the SIGTERM handler raises, mid-sweep
        return real(backend, inplace)

    monkeypatch.setattr(cases, "_loss_forward", forward)
    rc, data, _, out = _run(tmp_path, capsys)
    assert rc == 130
    assert [r["label"] for r in data["results"]] == ["reference"] and data["results"][0]["status"] == "ok"
    assert any("interrupted" in n for n in data["notes"]) and "interrupted" in out


def test_cli_rejects_bad_arguments(capsys):
    bad = (["--shapes", "3x8x64"], ["--dtypes", "fp64"], ["--backends", "reference,fast"])
    for argv in (*bad, ["--triton-config", "BLOCK_V=100"]):
        with pytest.raises(SystemExit) as exc:
            main(["--device", "cpu"] + argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()


def _row(label, kind, ms, rise, grad, *, baseline=False, inplace=False):
    logits = 8 * 2048 * 128256 * 2
    return {
        "case": "8x2048x128256 bf16",
        "shape_str": "8x2048x128256",
        "dtype": "bf16",
        "group": "logits",
        "label": label,
        "kind": kind,
        "baseline": baseline,
        "inplace": inplace,
        "status": "ok",
        "time_ms": {m: {"median_ms": v} for m, v in zip(("fwd", "bwd", "fwd_bwd"), ms)},
        "memory": {
            "logits_bytes": logits,
            "grad_bytes": grad,
            "fwd_bwd_rise_bytes": rise,
            "fwd_bwd_rise_excl_grad_bytes": rise - grad,
        },
    }


def test_gpu_ratios_bandwidth_and_targets_from_synthetic_rows():
    grad = 8 * 2048 * 128256 * 2
    rows = [
        _row("reference", "reference", (20.0, 20.0, 40.0), grad + 20 * 2**30, grad, baseline=True),
        _row("compiled", "compiled", (10.0, 10.0, 20.0), grad + 10 * 2**30, grad),
        _row("triton", "triton", (3.0, 3.0, 8.0), grad + 100 * 2**20, grad),
        _row("triton-inplace", "triton", (3.0, 3.0, 8.0), 2**20, 0, inplace=True),
    ]
    annotate(rows, device_type="cuda", copy_gbps=3000.0)
    triton = rows[2]
    assert triton["ratios"]["speedup_fwd_bwd"] == 5.0
    assert triton["ratios"]["speedup_vs_compiled_fwd_bwd"] == 2.5
    moved = 4 * 8 * 2048 * 128256 * 2
    assert triton["bandwidth"]["bytes"]["fwd_bwd"] == moved
    gbps = moved / 8e-3 / 1e9
    assert math.isclose(triton["bandwidth"]["GBps"]["fwd_bwd"], gbps)
    assert math.isclose(triton["bandwidth"]["pct_of_copy"]["fwd_bwd"], 100 * gbps / 3000.0)
    verdicts = {t["id"]: t["ok"] for t in triton["targets"]}
    expected = {"speedup_vs_naive": True, "speedup_vs_compiled": True, "bandwidth": True, "memory_vs_naive": True}
    assert verdicts == expected
    assert all(t["at_design_shape"] for t in triton["targets"])
    inplace = {t["id"]: t["ok"] for t in rows[3]["targets"]}
    assert inplace["inplace_no_alloc"] is True
    assert rows[0]["targets"] == [] and rows[1]["targets"] == []
