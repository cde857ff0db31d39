"""catdpo-train under faults: atomic checkpoints, a kill during a save, broken checkpoints, reruns and other runs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_training import TINY as _TINY

from catdpo_kernels.training import TrainConfig, train
from catdpo_kernels.training.checkpoint import SAVE_DELAY_ENV, CheckpointError, load_state
from catdpo_kernels.training.cli import main
from catdpo_kernels.training.validate import UsageError

TINY = dict(_TINY, eval_every=2)


def _cfg(out, **kw):
    return TrainConfig(**dict(TINY, **kw), output_dir=str(out))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _assert_same_state(a_dir, b_dir):
    a, b = load_state(a_dir), load_state(b_dir)
    assert a["step"] == b["step"]
    for key in ("model", "reference"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for key in ("value", "ema_count", "ema_unsafe"):
        assert torch.equal(a["margins"][key], b["margins"][key]), key
    assert a["margins"]["history"] == b["margins"]["history"]


def _cli_args(out, steps):
    """The command line of ``_cfg(out, max_steps=steps, save_every=2)``."""
    return [
        *("--output-dir", str(out), "--max-steps", str(steps), "--save-every", "2", "--eval-every", "2"),
        *("--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "2"),
        *("--max-train-pairs", "96", "--max-eval-pairs", "40", "--batch-size", "8", "--max-length", "96"),
        *("--max-prompt-length", "32"),
        *("--device", "cpu", "--threads", "1", "--no-progress", "--no-plot", "--quiet"),
    ]


def _kill_during_save(out, step: int):
    """Train in a subprocess; SIGKILL it while the checkpoint of ``step`` is written but not yet published."""
    env = dict(os.environ, **{SAVE_DELAY_ENV: f"{step}:120"})
    cmd = [sys.executable, "-m", "catdpo_kernels.training", *_cli_args(out, 6)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    try:
        for line in proc.stderr:
            if f"checkpoint {step} written" in line:
                break
            assert time.time() < deadline, "the run never reached the save"
        else:
            pytest.fail(f"the run ended before the save of step {step} (status {proc.wait()})")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_a_save_then_resume_auto_is_bit_identical(tmp_path, capsys):
    killed, full = tmp_path / "killed", tmp_path / "full"
    _kill_during_save(killed, step=4)
    assert (killed / "checkpoint-000002" / "COMPLETE").is_file()
    assert not (killed / "checkpoint-000004").exists(), "an unfinished save must never look like a checkpoint"
    assert any(p.name.startswith(".checkpoint-000004.tmp") for p in killed.iterdir())
    # A save of the old, non-atomic kind, cut short: a 0-byte state.pt and no manifest. It used to end in EOFError.
    (killed / "checkpoint-000005").mkdir()
    (killed / "checkpoint-000005" / "state.pt").write_bytes(b"")

    summary = train(_cfg(killed, max_steps=6, save_every=2))
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-000005" in err and "incomplete" in err
    assert summary["steps"] == 6
    assert not any(p.name.startswith(".checkpoint-") for p in killed.iterdir()), "the leftover save is cleaned up"

    train(_cfg(full, max_steps=6, save_every=2))
    _assert_same_state(killed / "checkpoint-000006", full / "checkpoint-000006")
    a, b = _metrics(killed), _metrics(full)
    assert [r["step"] for r in a if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert _without_time(a) == _without_time(b)
    times = [r["time"] for r in a if r["kind"] == "train"]
    assert times == sorted(times), "the time field continues across the resume"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished")
    summary = train(_cfg(out, max_steps=6, save_every=2))
    return out, summary


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checkpoints_load_weights_only(finished_run):
    out, _ = finished_run
    state = torch.load(out / "checkpoint-000006" / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 6 and isinstance(state["rng"]["numpy"]["key"], list)
    manifest = json.loads((out / "checkpoint-000006" / "COMPLETE").read_text())
    assert (
        manifest["step"] == 6
        and manifest["files"]["state.pt"] == (out / "checkpoint-000006" / "state.pt").stat().st_size
    )
    assert manifest["run_id"] == json.loads((out / "run.json").read_text())["run_id"]


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run[0], tmp_path / "run")
    state = out / "checkpoint-000006" / "state.pt"
    state.write_bytes(os.urandom(state.stat().st_size))  # same size: only loading it shows the damage
    summary = train(_cfg(out, max_steps=8, save_every=2))
    err = capsys.readouterr().err
    assert "checkpoint-000006" in err and "cannot be loaded" in err
    log = (out / "train.log").read_text()
    assert "resuming from" in log and "checkpoint-000004 (step 4 of 8)" in log
    assert summary["steps"] == 8
    assert [r["step"] for r in _metrics(out) if r["kind"] == "train"] == list(range(1, 9))
    _assert_same_state(out / "checkpoint-000006", finished_run[0] / "checkpoint-000006")


def test_truncated_checkpoint_named_in_the_error(finished_run, tmp_path):
    out = _copy_run(finished_run[0], tmp_path / "run")
    ckpt = out / "checkpoint-000004"
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="checkpoint-000004.*state.pt has"):
        train(_cfg(out, max_steps=6, save_every=2, resume=str(ckpt)))
    with pytest.raises(CheckpointError, match="checkpoint-000004"):
        load_state(ckpt)


def test_rerun_of_a_finished_run_reports_it(finished_run, capsys):
    out, summary = finished_run
    again = train(_cfg(out, max_steps=6, save_every=2, quiet=False))
    assert again["already_finished"] and again["steps"] == 6 and again["eval"] == summary["eval"]
    assert "already finished" in capsys.readouterr().out


def test_readme_command_twice_via_cli(tmp_path, capsys):
    args = _cli_args(tmp_path, 2)
    args.remove("--quiet")
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "Held-out results" in first
    t0 = time.perf_counter()
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "already finished (2 steps)" in second and "Held-out results" in second
    assert time.perf_counter() - t0 < 5


def test_extending_max_steps_resumes(finished_run, tmp_path):
    out = _copy_run(finished_run[0], tmp_path / "run")
    summary = train(_cfg(out, max_steps=8, save_every=2))
    assert summary["steps"] == 8 and "already_finished" not in summary
    assert [r["step"] for r in _metrics(out) if r["kind"] == "train"] == list(range(1, 9))
    with pytest.raises(UsageError, match="past the 4 steps"):
        train(_cfg(out, max_steps=4, save_every=2))


def test_resume_from_an_older_checkpoint_truncates_the_metrics(finished_run, tmp_path):
    out = _copy_run(finished_run[0], tmp_path / "run")
    before = _metrics(out)
    summary = train(_cfg(out, max_steps=6, save_every=2, resume=str(out / "checkpoint-000004")))
    assert summary["steps"] == 6
    after = _metrics(out)
    # used to append duplicate steps [1..6, 5, 6]
    assert [r["step"] for r in after if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert _without_time(after) == _without_time(before)
    t4 = next(r["time"] for r in after if r["kind"] == "train" and r["step"] == 4)
    t5 = next(r["time"] for r in after if r["kind"] == "train" and r["step"] == 5)
    assert t5 > t4 > 0, "the clock continues from the checkpoint's training time"


def test_output_dir_of_another_run_is_refused(finished_run, tmp_path):
    out = _copy_run(finished_run[0], tmp_path / "run")
    with pytest.raises(UsageError, match=r"holds another run \(--lr 0.001 -> 0.5\)"):
        train(_cfg(out, max_steps=6, lr=0.5))
    with pytest.raises(UsageError, match="already holds this run"):
        train(_cfg(out, max_steps=6, resume="no"))
    summary = train(_cfg(out, max_steps=2, lr=0.5, overwrite=True))
    assert summary["steps"] == 2 and summary["config"]["lr"] == 0.5
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002"]


def test_checkpoint_of_other_options_is_refused(finished_run, tmp_path):
    with pytest.raises(UsageError, match="other options .*--seed 0 -> 1"):
        train(_cfg(tmp_path / "new", max_steps=6, seed=1, resume=str(finished_run[0] / "checkpoint-000004")))


def test_changed_data_is_refused_on_resume(tmp_path):
    import shutil

    from catdpo_kernels import data as D

    data = tmp_path / "pairs.jsonl"
    shutil.copy(D.sample_path("train"), data)
    out = tmp_path / "run"
    train(_cfg(out, max_steps=2, data=str(data), max_train_pairs=None, max_eval_pairs=None))
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, another order: other pairs held out
    with pytest.raises(UsageError, match="the data differ"):
        train(_cfg(out, max_steps=4, data=str(data), max_train_pairs=None, max_eval_pairs=None))


def test_compare_rerun_reuses_finished_runs(tmp_path, capsys):
    from catdpo_kernels.training import compare

    cfg = dataclasses.replace(_cfg(tmp_path, max_steps=2, quiet=False), max_train_pairs=48, max_eval_pairs=24)
    first = compare(cfg)
    capsys.readouterr()
    second = compare(cfg)
    out = capsys.readouterr().out
    assert all(r.get("already_finished") for r in second["results"].values())
    assert second["table"] == first["table"]
    assert out.count("already finished") == 3
