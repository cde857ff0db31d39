"""The training loop: ``train(cfg)`` runs one job, ``compare(cfg)`` runs ``dpo``, ``safedpo`` and ``catdpo``.

One optimiser step:

* ``grad_accum`` micro-batches, each ``batch_size`` pairs per rank, run the policy
  (and, unless ``precompute_ref``, the frozen reference) and the run's one
  ``CatDPOLoss``, which adds each micro-batch's ``category_stats`` to the step's sum;
* after the optimiser step, ``criterion.update_margins()`` feeds that sum to the
  margins once; it all-reduces it across ranks, so every rank holds the same margins.

Outputs under ``output_dir``: ``run.json`` (written first: run id, fingerprint,
status; see ``rundir``), ``metrics.jsonl`` (one line per optimiser step, plus the
held-out evaluations), ``train.log`` (everything the run printed), ``eval.json``
and ``eval_table.txt`` (the final per-category table), ``margins.png``,
``summary.json`` and ``checkpoint-*/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..cpu_threads import thread_count
from . import distributed
from .batches import collate, step_schedule, steps_per_epoch
from .checkpoint import save_checkpoint
from .config import COMPARE_LOSS_TYPES, TrainConfig
from .criterion import stop_input_checks
from .evaluation import evaluate
from .job import Job, build_job
from .model import batch_loss
from .report import (
    MetricsLog,
    format_compare_table,
    format_eval_table,
    progress_postfix,
    report_finished,
    truncate_metrics,
)
from .rundir import RunPlan, claim, claim_compare, mark_finished, plan_compare, plan_run, release, write_json_atomic
from .validate import UsageError, validate


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns a summary dict (also written to ``summary.json`` on rank 0).

    A run already finished in ``cfg.output_dir`` is reported, not run again (``already_finished``
    in the summary); an unfinished one is resumed (``resume="auto"``, the default).
    Raises ``UsageError`` for a user mistake.
    """
    cfg = validate(cfg)
    with thread_count(cfg.threads), distributed.process_group(cfg.device):
        return _train(cfg)


def compare(cfg: TrainConfig, loss_types=COMPARE_LOSS_TYPES) -> dict:
    """Train ``dpo``, ``safedpo`` and ``catdpo`` with one seed and data; print one table, write ``compare.png``.

    Each run writes its detail (data report, set-up, its own table) to ``<output_dir>/<loss>/train.log``;
    the console gets one line per run, the side-by-side table and the figure's path.
    """
    cfg = validate(cfg, compare=True)
    plan_compare(cfg)
    with thread_count(cfg.threads), distributed.process_group(cfg.device):
        rank, _ = distributed.rank_world()
        say = print if rank == 0 and not cfg.quiet else (lambda *a, **k: None)
        if rank == 0:
            claim_compare(cfg, loss_types)
        subs = {
            lt: dataclasses.replace(cfg, loss_type=lt, output_dir=str(Path(cfg.output_dir) / lt)) for lt in loss_types
        }
        for sub in subs.values():
            plan_run(sub)  # a refusal (another run in a sub-directory, say) before any training
        results = {}
        for lt, sub in subs.items():
            results[lt] = _train(sub, console=False)
            say(_compare_line(lt, results[lt], Path(sub.output_dir)), flush=True)
        table = format_compare_table(results)
        out = dict(results=results, table=table)
        if rank == 0:
            (Path(cfg.output_dir) / "compare_table.txt").write_text(table + "\n", encoding="utf-8")
            say("\n" + table, flush=True)
            if cfg.plot:
                from .plots import plot_compare

                out["plot"] = str(plot_compare(results, Path(cfg.output_dir) / "compare.png"))
                say(f"figure: {out['plot']}", flush=True)
        return out


def _compare_line(loss_type: str, summary: dict, out_dir: Path) -> str:
    agg = summary["eval"]["aggregate"]
    done = "already finished, " if summary.get("already_finished") else ""
    return (
        f"{loss_type}: {done}{summary['steps']} steps in {summary['train_seconds']:.1f}s, held-out unsafe rate "
        f"{agg['unsafe_rate']:.3f}, category gap {agg['category_gap']:.3f} (detail: {out_dir / 'train.log'})"
    )


def _plan(cfg: TrainConfig) -> RunPlan:
    """Every rank reads the plan; rank 0 then claims the directory (``run.json``) while the others wait."""
    plan = plan_run(cfg)
    distributed.barrier()
    if plan.finished is None and distributed.rank_world()[0] == 0:
        claim(cfg, plan)
    distributed.barrier()
    return plan


def _train(cfg: TrainConfig, console: bool = True) -> dict:
    plan = _plan(cfg)
    if plan.finished is not None:
        return report_finished(cfg, plan, console and distributed.rank_world()[0] == 0)
    try:
        job = build_job(cfg, plan, console)
    except UsageError:
        if plan.fresh and distributed.rank_world()[0] == 0:
            release(plan)
        raise
    for message in plan.warnings:
        job.log.warn(message)
    metrics = _open_metrics(job)
    try:
        train_seconds = _run_steps(job, metrics)
        final = job.evals[-1] if job.evals and job.evals[-1]["step"] == job.step else _evaluate(job, metrics)
    finally:
        metrics.close()
    ckpt = save_checkpoint(job)
    distributed.barrier()
    return _finish(job, final, ckpt, train_seconds)


def _open_metrics(job: Job) -> MetricsLog:
    """``metrics.jsonl``: new for a run from step 0; a resumed run's cut back to its checkpoint's step."""
    if not job.is_main:
        return MetricsLog(None, append=False)
    path = job.out_dir / "metrics.jsonl"
    if job.resumed:
        kept = truncate_metrics(path, job.step)
        if kept != job.step:
            job.log.warn(f"{path} holds {kept} of the {job.step} steps before the checkpoint; the rest are lost")
    return MetricsLog(path, append=job.resumed)


def _evaluate(job: Job, metrics: MetricsLog) -> dict:
    ev = evaluate(
        job.policy,
        job.loop_ref_model,
        job.held_split,
        job.cfg,
        job.criterion,
        job.pad_id,
        job.device,
        job.step,
        head=job.head,
        transform=job.head_transform,
    )
    job.evals.append(ev)
    metrics.write({"kind": "eval", **ev})
    return ev


def _run_steps(job: Job, metrics: MetricsLog) -> float:
    """Train up to the last step (evaluating and checkpointing on the way); returns the seconds it took."""
    from tqdm.auto import tqdm

    cfg = job.cfg
    n = len(job.train_split.tokenized)
    schedule = step_schedule(n, cfg, job.rank, job.world)
    total = total_steps(job)
    for _ in range(job.step):  # skip what the checkpoint already trained on
        next(schedule)
    if not job.resumed:
        _evaluate(job, metrics)  # the baseline: the policy equals the reference
    bar = tqdm(
        total=total,
        initial=job.step,
        disable=not (job.is_main and cfg.progress),
        desc=cfg.loss_type,
        dynamic_ncols=True,
    )
    job.policy.train()
    job.criterion.train()
    job.t_loop = time.perf_counter()
    while job.step < total:
        epoch, micro = next(schedule)
        rec = _train_step(job, epoch, micro)
        metrics.write(rec)
        bar.set_postfix(progress_postfix(rec["loss"], job.margins), refresh=False)
        bar.update(1)
        if cfg.eval_every and job.step % cfg.eval_every == 0 and job.step < total:
            _evaluate(job, metrics)
        if cfg.save_every and job.step % cfg.save_every == 0 and job.step < total:
            save_checkpoint(job)
            distributed.barrier()
    bar.close()
    return job.train_seconds()


def total_steps(job: Job) -> int:
    """The step the run trains to: ``--max-steps``, or ``--epochs`` whole epochs."""
    n = len(job.train_split.tokenized)
    return (
        job.cfg.max_steps if job.cfg.max_steps is not None else job.cfg.epochs * steps_per_epoch(n, job.cfg, job.world)
    )


def _train_step(job: Job, epoch: int, micro: list[list[int]]) -> dict:
    """One optimiser step over the micro-batches ``micro``; returns its ``metrics.jsonl`` record."""
    cfg = job.cfg
    loss_sum = torch.zeros((), dtype=torch.float64, device=job.device)
    reward_sums = torch.zeros(3, dtype=torch.float64, device=job.device)  # chosen, rejected, correct
    for k, idx in enumerate(micro):
        batch = collate(job.train_split, idx, job.pad_id, job.device)
        sync = k == len(micro) - 1 or job.world == 1  # DDP all-reduces the gradients on the last one only
        with contextlib.nullcontext() if sync else job.model.no_sync():
            out = _micro_batch_loss(job, batch)
            (out.loss / len(micro)).backward()
        loss_sum += out.loss.detach().double()
        diff = out.chosen_rewards - out.rejected_rewards
        correct = (diff > 0).sum() + 0.5 * (diff == 0).sum()  # a tie (policy = reference) counts half
        reward_sums += torch.stack([out.chosen_rewards.sum(), out.rejected_rewards.sum(), correct]).double()
    params = job.policy.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    job.criterion.update_margins()  # once per optimiser step; all-reduces across ranks
    job.step += 1
    return _step_record(job, epoch, len(micro), loss_sum, reward_sums, grad_norm)


def _micro_batch_loss(job: Job, batch: dict):
    """Policy (and reference) forward and the criterion: the micro-batch's ``LossOutput``."""
    out = batch_loss(
        job.head, job.model, job.loop_ref_model, batch, job.device, job.cfg, job.criterion, job.head_transform
    )
    stop_input_checks(job.criterion)  # the first call checked the values; the rest only shapes
    return out


def _step_record(job: Job, epoch, n_micro, loss_sum, reward_sums, grad_norm) -> dict:
    """The ``metrics.jsonl`` record of the step just taken (losses and rewards all-reduced over ranks)."""
    margins, names = job.margins, job.names
    packed = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), reward_sums]).cpu())
    n_pairs = n_micro * job.cfg.batch_size * job.world
    last = margins.history[-1]
    # A category no batch has held yet has no rate (CategoryMargins reports 0 for it).
    rate = [r if n > 0 else None for r, n in zip(last["rate"], last["count"])]
    job.history.append(dict(step=job.step, margin=margins.value.cpu().tolist(), rate=rate))
    return dict(
        kind="train",
        step=job.step,
        epoch=epoch,
        loss=packed[0].item() / (n_micro * job.world),
        lr=job.scheduler.get_last_lr()[0],
        grad_norm=None if grad_norm is None else float(grad_norm),
        chosen_reward=packed[1].item() / n_pairs,
        rejected_reward=packed[2].item() / n_pairs,
        reward_acc=packed[3].item() / n_pairs,
        margin=dict(zip(names, margins.value.cpu().tolist())),
        ema_unsafe_rate=dict(zip(names, last["rate"])),
        margin_active=[n for n, a in zip(names, last["active"]) if a],
        time=job.train_seconds(),
    )


def _finish(job: Job, final: dict, ckpt: Path | None, train_seconds: float) -> dict:
    """The summary (every rank); on rank 0 the final table, ``eval.json``, the plot, ``summary.json``, and
    ``run.json`` marked finished (last: a rerun reports a finished run only once all of it is written)."""
    cfg, margins = job.cfg, job.margins
    per_epoch = steps_per_epoch(len(job.train_split.tokenized), cfg, job.world)
    summary = dict(
        config=dataclasses.asdict(cfg),
        run_id=job.plan.run_id,
        steps=job.step,
        steps_per_epoch=per_epoch,
        world_size=job.world,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - job.t_start,
        eval=final,
        margins=margins.value.cpu().tolist(),
        # every rank's margins, to show (and test) that they agree
        rank_margins=distributed.all_gather_object(margins.value.cpu().tolist()),
        data=dict(train=job.train_split.report.as_dict(), held_out=job.held_split.report.as_dict()),
        checkpoint=str(ckpt) if ckpt else None,
        metrics=str(job.out_dir / "metrics.jsonl"),
    )
    if not job.is_main:
        return summary
    table = format_eval_table(final)
    job.log(table)
    (job.out_dir / "eval_table.txt").write_text(table + "\n", encoding="utf-8")
    (job.out_dir / "eval.json").write_text(json.dumps(final, indent=1), encoding="utf-8")
    if cfg.plot:
        summary["plot"] = str(_plot(job))
        job.log(f"plot: {summary['plot']}")
    write_json_atomic(job.out_dir / "summary.json", summary)
    mark_finished(job.plan, job.step, per_epoch)
    job.log(
        f"metrics: {summary['metrics']}; checkpoint: {ckpt}; {job.step} steps, {train_seconds:.1f}s of training "
        f"(this process: {summary['total_seconds']:.1f}s in all)"
    )
    return summary


def _plot(job: Job) -> Path:
    from .plots import plot_run

    options = dict(target=job.cfg.margin_target, safedpo_margin=job.cfg.safedpo_margin)
    return plot_run(job.history, job.evals, job.names, job.out_dir / "margins.png", job.cfg.loss_type, options)
