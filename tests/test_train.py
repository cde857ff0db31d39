"""End to end: the catdpo-train loop, checkpoint/resume, 2-process DDP, and CatDPOTrainer (TRL)."""

import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from _utils import tiny_llama
from tiny_training import TINY

from catdpo_kernels import data as D
from catdpo_kernels.training import TrainConfig, compare, train


def _records(out_dir, kind="train"):
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_three_step_run_margins_follow_unsafe_rates(tmp_path):
    cfg = TrainConfig(**dict(TINY, plot=True), max_steps=3, output_dir=str(tmp_path), margin_target=0.45, margin_lr=0.5)
    summary = train(cfg)
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)
    names = list(recs[0]["margin"])
    prev = {n: cfg.margin_init for n in names}
    moved = 0
    for r in recs:
        for n in names:
            delta = r["margin"][n] - prev[n]
            rate = r["ema_unsafe_rate"][n]
            # dual ascent: a category above its target unsafe rate gets a larger margin, one below a smaller one
            stepped = prev[n] + cfg.margin_lr * (rate - cfg.margin_target)
            expected = min(max(stepped, cfg.margin_min), cfg.margin_max) - prev[n]
            if n not in r["margin_active"]:  # too few pairs (EMA count < min_count) yet: does not move
                assert delta == 0.0
                continue
            assert delta == pytest.approx(expected, abs=1e-6)
            if abs(delta) > 1e-6:
                assert math.copysign(1.0, delta) == math.copysign(1.0, rate - cfg.margin_target)
                moved += 1
            prev[n] = r["margin"][n]
    assert moved > 0
    # the first step's policy equals the reference: soft unsafe rate sigmoid(0) = 0.5 > target, margins go up
    first = recs[0]
    seen = [n for n in names if first["ema_unsafe_rate"][n] > 0]
    assert seen and all(first["margin"][n] > cfg.margin_init for n in seen)
    # outputs: final held-out table, plot, summary
    ev = summary["eval"]
    assert ev["step"] == 3 and len(ev["categories"]) == 19
    for r in ev["categories"]:
        if r["count"]:
            assert 0.0 <= r["unsafe_rate"] <= 1.0 and 0.0 < r["soft_unsafe"] < 1.0
    assert ev["aggregate"]["category_gap"] >= 0.0 and ev["aggregate"]["category_variance"] >= 0.0
    assert (tmp_path / "margins.png").stat().st_size > 10_000
    assert "best-to-worst gap" in (tmp_path / "eval_table.txt").read_text()
    assert _records(tmp_path, "eval")[0]["step"] == 0  # baseline evaluation before the first step


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    base = dict(TINY, grad_accum=2, precompute_ref=True, margin_lr=0.3)
    full = train(TrainConfig(**base, max_steps=4, output_dir=str(tmp_path / "full")))
    part = TrainConfig(**base, max_steps=2, output_dir=str(tmp_path / "resumed"))
    train(part)
    resumed = train(dataclasses.replace(part, max_steps=4, resume="auto"))
    assert resumed["steps"] == 4
    a, b = _records(tmp_path / "full"), _records(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7)
        assert rb["margin"] == pytest.approx(ra["margin"], rel=1e-6, abs=1e-7)
    assert resumed["margins"] == pytest.approx(full["margins"], rel=1e-6, abs=1e-7)
    soft_unsafe = full["eval"]["aggregate"]["soft_unsafe"]
    assert resumed["eval"]["aggregate"]["soft_unsafe"] == pytest.approx(soft_unsafe, rel=1e-5)
    # a run with other trajectory-defining options refuses the directory of this one
    with pytest.raises(ValueError, match=r"holds another run \(--lr 0.001 -> 0.5\)"):
        train(dataclasses.replace(part, max_steps=4, resume="auto", lr=0.5))


def test_compare_prints_one_concise_table_and_one_figure(tmp_path, capsys):
    tiny = dict(TINY, max_train_pairs=48, max_eval_pairs=24, quiet=False, plot=True)
    cfg = TrainConfig(**tiny, max_steps=2, output_dir=str(tmp_path))
    res = compare(cfg)
    assert set(res["results"]) == {"dpo", "safedpo", "catdpo"}
    out = capsys.readouterr().out
    header = [ln for ln in out.splitlines() if "dpo" in ln and "catdpo" in ln and "safedpo" in ln]
    assert header, out
    assert "best-to-worst gap" in out and "catdpo margin" in out
    # one line per run, the table, the figure: the per-run detail goes to each run's train.log
    assert len(out.splitlines()) < 50, out
    assert "Disrupting Public Order (" in out and "Disrupti." not in out  # full category names
    assert "[train]" not in out and "[train]" in (tmp_path / "catdpo" / "train.log").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert (tmp_path / "compare_table.txt").read_text().strip() == res["table"].strip()
    # the dpo and safedpo runs never move their (tracker) margins; catdpo does
    assert set(res["results"]["dpo"]["margins"]) == {0.0}
    assert set(res["results"]["safedpo"]["margins"]) == {cfg.safedpo_margin}
    assert len(set(res["results"]["catdpo"]["margins"])) > 1


def test_cli_train_is_the_default_subcommand(tmp_path):
    from catdpo_kernels.training.cli import main

    args = [
        "--max-steps",
        "1",
        "--max-train-pairs",
        "16",
        "--max-eval-pairs",
        "8",
        "--batch-size",
        "8",
        "--hidden-size",
        "16",
        "--intermediate-size",
        "32",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--no-progress",
        "--no-plot",
        "--quiet",
        "--loss-type",
        "safedpo",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["config"]["loss_type"] == "safedpo"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_identical_margins(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "catdpo_kernels.training",
        "train",
        "--max-steps",
        "2",
        "--max-train-pairs",
        "64",
        "--max-eval-pairs",
        "16",
        "--batch-size",
        "8",
        "--hidden-size",
        "32",
        "--intermediate-size",
        "64",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--eval-every",
        "0",
        "--no-progress",
        "--no-plot",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
    ]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    rank0, rank1 = summary["rank_margins"]
    assert rank0 == rank1, "every rank holds the same margins"
    assert rank0 != [0.5] * 19, "the margins moved"
    assert proc.stdout.count("Held-out results") == 1, "only rank 0 prints"
    assert len(_records(out)) == 2
    # Two ranks of 8 pairs see the pairs one process with batches of 16 sees, step for step
    # (the README's torchrun note): the same losses and margins up to summation order.
    single = tmp_path / "single"
    argv = cmd[cmd.index("train") :]
    argv[argv.index("--batch-size") + 1] = "16"
    argv[argv.index("--output-dir") + 1] = str(single)
    proc = subprocess.run(
        [sys.executable, "-m", "catdpo_kernels.training", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ddp_step, one_step in zip(_records(out), _records(single), strict=True):
        assert ddp_step["loss"] == pytest.approx(one_step["loss"], rel=1e-5)
        assert list(ddp_step["margin"].values()) == pytest.approx(list(one_step["margin"].values()), rel=1e-5)


def test_catdpo_trainer_two_steps(tmp_path):
    pytest.importorskip("trl")
    from trl import DPOConfig

    from catdpo_kernels.integrations.trl import MARGINS_FILE, CatDPOCollator, CatDPOTrainer

    pairs, _ = D.load_pairs(split="train", limit=40)
    tok = D.build_word_tokenizer(D.pair_texts(pairs))
    model = tiny_llama(tok)
    ds = D.pairs_to_dataset(pairs)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = CatDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        margin_kwargs=dict(lr=0.5, target=0.1),
    )
    assert isinstance(trainer.data_collator, CatDPOCollator)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["category"].shape == (3, 19) and batch["unsafe"].shape == (6,)
    assert batch["input_ids"].shape[0] == 6

    # The reference is a copy of the policy, so h = 0 for every pair.
    from catdpo_kernels import CategoryStats

    with torch.no_grad():
        trainer.model.eval()
        trainer.compute_loss(trainer.model, batch)
        trainer.model.train()
    reward_margin = CategoryStats(trainer.criterion.pop_eval_stats()).reward_margin_sum
    assert reward_margin.abs().max() < 1e-3, reward_margin
    trainer._metrics["eval"].clear()

    init = trainer.margins.value.clone()
    trainer.train()
    assert trainer.margins.step == 2, "one margin update per optimiser step (4 micro-batches, 2 steps)"
    assert not torch.equal(trainer.margins.value.cpu(), init.cpu())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert any(k.startswith("catdpo/margin/") for k in logs[-1])
    assert logs[-1]["catdpo/margin/Cybercrime"] == pytest.approx(trainer.margins.value[13].item())
    assert (tmp_path / "checkpoint-2" / MARGINS_FILE).is_file()


def test_compatibility_paths():
    import catdpo_kernels.cli
    import catdpo_kernels.train
    import catdpo_kernels.training
    import catdpo_kernels.training.cli

    assert catdpo_kernels.train.TrainConfig is catdpo_kernels.training.TrainConfig
    assert catdpo_kernels.train.train is catdpo_kernels.training.train
    assert catdpo_kernels.train.compare is catdpo_kernels.training.compare
    assert catdpo_kernels.train.main is catdpo_kernels.cli.main is catdpo_kernels.training.cli.main
