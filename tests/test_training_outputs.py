"""What catdpo-train shows: ties counted half, figures without meaningless panels, the quick start's story."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from tiny_training import TINY as _TINY

from catdpo_kernels.training import TrainConfig, train
from catdpo_kernels.training.plots import compare_figure, run_figure, worst_categories

TINY = dict(_TINY, max_train_pairs=64, eval_every=1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {
        lt: train(TrainConfig(**TINY, loss_type=lt, max_steps=3, output_dir=str(out / lt))) for lt in ("dpo", "catdpo")
    }


def _records(summary, kind):
    lines = Path(summary["metrics"]).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_tie_counts_half(runs):
    # Before the first step the policy is the reference: h = 0 for every pair. A tie is no evidence
    # either way; it used to count as unsafe (rate 1.0 everywhere) and as wrong (accuracy 0.0).
    baseline = _records(runs["catdpo"], "eval")[0]
    assert baseline["step"] == 0
    assert {r["unsafe_rate"] for r in baseline["categories"] if r["count"]} == {0.5}
    assert {r["soft_unsafe"] for r in baseline["categories"] if r["count"]} == {0.5}
    assert baseline["aggregate"]["unsafe_rate"] == 0.5 and baseline["aggregate"]["benign_accuracy"] == 0.5
    first = _records(runs["catdpo"], "train")[0]
    assert first["step"] == 1 and first["reward_acc"] == 0.5  # the first step's forward is at policy = reference
    later = _records(runs["catdpo"], "eval")[-1]
    assert later["step"] == 3 and any(r["unsafe_rate"] not in (None, 0.5) for r in later["categories"])


def test_run_figure_panels_by_loss_type(runs, tmp_path):
    names = [r["name"] for r in runs["catdpo"]["eval"]["categories"]]
    figs = {}
    for lt in ("dpo", "catdpo"):
        job_history = torch.load(Path(runs[lt]["checkpoint"]) / "state.pt", weights_only=True)
        evals = _records(runs[lt], "eval")
        figs[lt] = run_figure(job_history["history"], evals, names, lt, dict(target=0.1, safedpo_margin=0.5))
    titles = {lt: [ax.get_title() for ax in f.axes] for lt, f in figs.items()}
    assert len(titles["catdpo"]) == 3 and any("margin" in t for t in titles["catdpo"][:1])
    assert len(titles["dpo"]) == 2 and not any(t.startswith("per-category margin") for t in titles["dpo"])
    # one legend for all panels: the highlighted categories by their full names, the rest in grey
    worst = worst_categories(runs["catdpo"]["eval"])
    labels = [t.get_text() for t in figs["catdpo"].legends[0].get_texts()]
    assert [names[c] for c in worst] == labels[: len(worst)]
    assert f"the other {len(names) - len(worst)} categories" in labels
    assert "(no margin)" in figs["dpo"]._suptitle.get_text()


def test_compare_figure_has_full_names_and_the_spread(runs):
    results = dict(runs)
    fig = compare_figure(results)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    counted = [r for r in runs["dpo"]["eval"]["categories"] if r["count"]]
    assert len(ticks) == len(counted) and all("(n=" in t for t in ticks)
    assert max(len(t) for t in ticks) > 20  # full names, never cut to 9 characters
    assert [ax.get_title() for ax in fig.axes[1:]] == [
        "unsafe rate, all safe-vs-unsafe pairs",
        "variance across categories",
        "best-to-worst category gap",
    ]


def test_quickstart_explains_a_rising_loss_and_converges(monkeypatch, capsys):
    from catdpo_kernels.cpu_threads import thread_count

    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--steps", "70", "--device", "cpu"])
    with thread_count(1):  # many tiny ops: a second thread only spins
        runpy.run_path(str(ROOT / "python" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    loss_learnable = [float(r[2]) for r in rows]
    assert max(loss_learnable[:4]) > loss_learnable[0] + 0.3, "the loss rises while the margins climb"
    assert loss_learnable[-1] < 0.1, "then the learnable categories converge"
    final = json.loads(out.split("final margins:")[1].splitlines()[0].replace("'", '"'))
    assert final["self-harm"] == 3.0 and max(v for k, v in final.items() if k != "self-harm") < 0.5
    assert "How to read this" in out and "z = beta*h - s*margin" in out
