"""benchmarks/gpu_check.sh: its control flow, run as a CPU dry run (tiny shapes, no GPU stages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def run_check(out: Path, **env) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "CATDPO_GPU_CHECK_SKIP_INSTALL": "1",
        **env,
    }
    full_env.pop("TRITON_INTERPRET", None)  # the script never benchmarks the interpreter
    return subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=600)


def test_without_a_gpu_it_refuses_unless_asked_for_a_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_check(tmp_path)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout
    assert "CATDPO_GPU_CHECK_ALLOW_CPU=1" in proc.stdout


@pytest.mark.slow
def test_dry_run_writes_the_promised_files_and_summary(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the dry run is for machines without one")
    proc = run_check(tmp_path, CATDPO_GPU_CHECK_ALLOW_CPU="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    # At most 8 files come back from a GPU machine; none of them hidden or temporary.
    assert len(files) <= 8, files
    assert not [f for f in files if f.startswith(".")], files
    assert {"log.txt", "tests.log", "summary.md", "bench.png"} <= set(files)
    # Named as `catdpo-bench --save-results` names them, so they go into benchmarks/results/ unchanged.
    head = [f for f in files if "_head_" in f and f.endswith(".json")]
    logits = [f for f in files if f.endswith(".json") and f not in head]
    assert len(logits) == 1 and len(head) == 1, files
    slug, _, stamp = head[0].removesuffix(".json").partition("_head_")
    assert logits[0] == f"{slug}_{stamp}.json"
    assert slug.startswith("cpu-") and len(stamp) == len("20261128T113815")
    logits_report = json.loads((tmp_path / logits[0]).read_text())
    status = {r["label"]: r["status"] for r in logits_report["results"]}
    assert status["reference"] == status["torch"] == "ok", status
    # The interpreter is never timed: the triton rows are skipped with a reason on a CPU.
    triton = next(r for r in logits_report["results"] if r["label"] == "triton")
    assert triton["status"] == "skipped" and "CUDA" in triton["note"]

    summary = (tmp_path / "summary.md").read_text()
    for stage in ("logits target", "head target", "other shapes"):
        assert f"| {stage} | ok |" in summary, summary
    assert "| tests | note |" in summary
    # The other shapes ride along in the logits markdown, not as files of their own.
    assert "## Other shapes" in (tmp_path / logits[0].replace(".json", ".md")).read_text()


def test_a_budget_too_small_skips_stages_instead_of_overrunning(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_check(tmp_path, CATDPO_GPU_CHECK_ALLOW_CPU="1", CATDPO_GPU_CHECK_BUDGET="20")
    summary = (tmp_path / "summary.md").read_text()
    assert "| logits target | skipped | 0 | out of time |" in summary, summary
    assert "no benchmark results were written" in summary
    assert proc.returncode == 0
