"""catdpo-train's command line: --help without torch, and one clear line (status 2) for every user mistake."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from catdpo_kernels import data as D
from catdpo_kernels.hub_names import looks_like_hub_name
from catdpo_kernels.training import config as C
from catdpo_kernels.training import validate as V
from catdpo_kernels.training.cli import main

TINY = (
    "--hidden-size 16 --intermediate-size 32 --num-layers 1 --num-heads 2 --max-train-pairs 16 --max-eval-pairs 8 "
    "--batch-size 8 --max-length 64 --max-prompt-length 32 --max-steps 2 --eval-every 0 "
    "--no-progress --no-plot --quiet --device cpu --threads 1"
).split()


def _without(args, *options):
    """``args`` without ``options`` and their values."""
    out = list(args)
    for option in options:
        i = out.index(option)
        del out[i : i + 2]
    return out


def _run(capsys, *args):
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own errors exit (with our one-line message)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(capsys, *args, match: str) -> str:
    """The command exits 2 with exactly one ``error: ...`` line on stderr that contains ``match``."""
    rc, _, err = _run(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_help_is_fast_lists_training_options_and_imports_no_torch():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['catdpo-train', '--help']\n"
        "try:\n    runpy.run_module('catdpo_kernels.training', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('IMPORTED', [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout[-300:]
    for option in ("--margin-lr", "--loss-type", "--max-steps", "--resume", "--overwrite", "--threads", "--compare"):
        assert option in proc.stdout
    assert "catdpo-train data" in proc.stdout  # the data subcommand stays reachable
    assert elapsed < 3.0, f"--help took {elapsed:.2f}s"


def test_data_subcommand_still_works(capsys):
    rc, out, _ = _run(capsys, "data", "--split", "test")
    assert rc == 0 and "Cybercrime" in out and "both safe" in out


def test_copies_of_data_layer_rules_agree():
    # config.py copies data.py's preference keys so that --help need not import torch.
    assert C.PREFERENCE_KEYS == D.PREFERENCE_KEYS


@pytest.mark.parametrize(
    "text, hub",
    [
        ("PKU-Alignment/PKU-SafeRLHF", True),
        ("teknium/OpenHermes-2.5", True),  # a version, not a file extension
        ("data/x.jsonl", False),
        ("./a/b", False),
        ("~/a", False),
        ("a/b/c", False),
        ("a", False),
        ("a\\b", False),
    ],
)
def test_hub_name_rule(text, hub):
    assert looks_like_hub_name(text) is hub


def test_missing_data_file(capsys, tmp_path):
    _one_error(capsys, "--data", str(tmp_path / "nope.jsonl"), *TINY, match="no such file or directory")


def test_data_directory_without_the_split(capsys, tmp_path):
    shutil.copy(D.sample_path("train"), tmp_path / "train.jsonl")
    _one_error(capsys, "--data", str(tmp_path), *TINY, "--output-dir", str(tmp_path / "o"), match="no test.jsonl")


def test_hub_name_without_network_fails_at_once(capsys, monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    t0 = time.perf_counter()
    line = _one_error(capsys, "--data", "someone/some-data", *TINY, match="cannot be reached")
    assert "HF_HUB_OFFLINE" in line and time.perf_counter() - t0 < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu(capsys):
    _one_error(capsys, *TINY, "--device", "cuda", match="no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_backend_triton_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for the kernel tests
    _one_error(capsys, *TINY, "--backend", "triton", match="--backend triton needs a CUDA device")


def test_bad_resume_path(capsys, tmp_path):
    _one_error(capsys, *TINY, "--resume", str(tmp_path / "checkpoint-000009"), match="no such directory")
    (tmp_path / "junk").mkdir()
    _one_error(capsys, *TINY, "--resume", str(tmp_path / "junk"), match="not a checkpoint folder")


def test_max_length_must_leave_room_for_a_response(capsys, tmp_path):
    # Every response used to be cut to 0 tokens: 2 steps with grad norm 0, margins grown on a made-up rate.
    line = _one_error(capsys, *TINY, "--max-length", "128", "--max-prompt-length", "128", match="--max-length 128")
    assert "no room for a response" in line
    assert not (tmp_path / "o").exists()


def test_too_few_pairs_for_one_step(capsys, tmp_path):
    # --batch-size 1000 used to train 0 steps, print unsafe 1.000 everywhere and exit 0.
    out = tmp_path / "o"
    _one_error(capsys, *TINY, "--batch-size", "1000", "--output-dir", str(out), match="too few for one optimiser step")
    assert not out.exists(), "a run stopped by a user mistake leaves no claim on its directory"
    rc, _, err = _run(capsys, *TINY, "--batch-size", "4", "--output-dir", str(out))
    assert rc == 0, err


def test_eval_fraction_out_of_range(capsys):
    _one_error(capsys, *TINY, "--eval-fraction", "1.5", match="--eval-fraction must be in (0, 1)")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers(capsys, value):
    # --max-grad-norm nan silently turned clipping off (nan > 0 is False).
    _one_error(capsys, *TINY, "--max-grad-norm", value, match="--max-grad-norm must be a finite number")


def test_argparse_mistakes_are_one_line(capsys):
    _one_error(capsys, "--lr", "fast", match="--lr")
    _one_error(capsys, "--no-such-option", match="unrecognized arguments")


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(V.UsageError, match="--eval-fraction"):
        main([*TINY, "--eval-fraction", "1.5", "--debug"])


def test_data_path_with_tilde_is_expanded(capsys, monkeypatch, tmp_path):
    # '~/x.jsonl' was not recognised as a file: the whole file became the training split *and* the held-out one.
    shutil.copy(D.sample_path("train"), tmp_path / "x.jsonl")
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "o"
    rc, _, err = _run(
        capsys,
        "--data",
        "~/x.jsonl",
        *_without(TINY, "--max-train-pairs", "--max-eval-pairs"),
        "--output-dir",
        str(out),
    )
    assert rc == 0, err
    data = json.loads((out / "summary.json").read_text())["data"]
    n = data["train"]["kept"] + data["held_out"]["kept"]
    assert data["held_out"]["kept"] == round(0.2 * n)  # the held-out split is carved from the file
    assert json.loads((out / "run.json").read_text())["config"]["data"] == str(tmp_path / "x.jsonl")


def test_data_subcommand_reports_mistakes_in_one_line(capsys, monkeypatch, tmp_path):
    _one_error(capsys, "data", "--data", str(tmp_path / "missing.jsonl"), match="no such file or directory")
    (tmp_path / "empty.jsonl").write_text("\n")
    _one_error(capsys, "data", "--data", str(tmp_path / "empty.jsonl"), match="holds no rows")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    rc, _, err = _run(capsys, "data", "--data", str(tmp_path / "bad.jsonl"))
    assert rc == 2 and err.startswith("error: 1 malformed row(s)") and "bad.jsonl:1: invalid JSON" in err
    shutil.copy(D.sample_path("test"), tmp_path / "t.jsonl")
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, out, _ = _run(capsys, "data", "--data", "~/t.jsonl")
    assert rc == 0 and "Cybercrime" in out


def test_output_dir_of_another_kind_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _one_error(capsys, *TINY, "--output-dir", str(tmp_path), match="holds no catdpo-train run")
    rc, _, err = _run(capsys, *TINY, "--output-dir", str(tmp_path), "--overwrite")
    assert rc == 0, err
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite removes only what catdpo-train writes


def test_cli_picks_threads_but_respects_the_environment(monkeypatch):
    from catdpo_kernels import cpu_threads as T

    assert T.auto_threads(cores=2, load=0.1) == 2
    assert T.auto_threads(cores=2, load=1.0) == 1  # one busy process on 2 cores: one thread
    assert T.auto_threads(cores=2, load=5.0) == 1
    assert T.auto_threads(cores=16, load=3.4, local_world=2) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.user_thread_setting() == "OMP_NUM_THREADS=3"
    before = torch.get_num_threads()
    with T.thread_count(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with T.thread_count(None):
        assert torch.get_num_threads() == before


def test_cli_thread_choice_reaches_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a very busy machine: one thread
    assert main([*_without(TINY, "--threads"), "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["threads"] == 1
    assert "1 CPU thread(s)" in (tmp_path / "train.log").read_text()
