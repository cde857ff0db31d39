"""The output directory of a run: who owns it, which checkpoints are complete, what a rerun does.

A run directory holds ``run.json`` (written first: the run id, the config and its
fingerprint, the status), ``metrics.jsonl``, the final outputs and
``checkpoint-NNNNNN/`` folders. A checkpoint is complete when its ``COMPLETE``
manifest is there: the save writes everything into a hidden temporary folder,
fsyncs it, writes the manifest last and renames the folder into place, so a
crash mid-save never leaves a ``checkpoint-*`` that looks usable.

``plan_run`` decides, reading only, what a run with a given config does in its
output directory:

* nothing there (or ``--overwrite``): a fresh run with a new run id;
* this run (same fingerprint: the options that decide the results), finished with
  the same step count: nothing to do, the summary is reported;
* this run, unfinished or extended (``--max-steps`` raised): resume from the newest
  complete checkpoint of this run id, skipping broken ones with a warning;
* another run, or files that are not a catdpo-train run: refused unless ``--overwrite``.

This module imports no torch: the command line runs it before any heavy work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig, fingerprint, option_diff
from .validate import UsageError

PROGRAM = "catdpo-train"
RUN_FILE = "run.json"
COMPARE_FILE = "compare.json"
MANIFEST = "COMPLETE"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 2
# What catdpo-train writes into a run directory; --overwrite removes these and nothing else.
RUN_OUTPUTS = (RUN_FILE, "metrics.jsonl", "summary.json", "eval.json", "eval_table.txt", "margins.png", "train.log")
COMPARE_OUTPUTS = (COMPARE_FILE, "compare_table.txt", "compare.png")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")
# A save in progress (or killed mid-way): hidden, so that no glob for checkpoint-* ever sees it.
PARTIAL_NAME = re.compile(r"\.checkpoint-\d+\.(tmp|old)-\d+$")


# ------------------------------------------------------------------ durable small files
def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to a temporary name, fsync, rename over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; ``None`` when there is no such file; ``UsageError`` when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg}); pass --overwrite to start this run again") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} does not hold a JSON object; pass --overwrite to start this run again")
    return obj


# ------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict | None
    problem: str | None = None
    """Why it cannot be used (``None``: complete as far as the manifest tells)."""


def inspect_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint folder and, if it cannot be used, why (no manifest, a file missing or of the wrong size)."""
    m = CHECKPOINT_NAME.match(path.name)
    step = int(m.group(1)) if m else -1
    try:
        manifest = read_json(path / MANIFEST)
    except UsageError:
        return Checkpoint(path, step, None, f"its {MANIFEST} manifest is unreadable")
    if manifest is None:
        return Checkpoint(
            path,
            step,
            None,
            f"incomplete (no {MANIFEST} manifest: the save did not finish, or an older catdpo-train wrote it)",
        )
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return Checkpoint(path, step, manifest, f"{name} is missing")
        if f.stat().st_size != size:
            return Checkpoint(path, step, manifest, f"{name} has {f.stat().st_size} bytes, the manifest says {size}")
    return Checkpoint(path, int(manifest.get("step", step)), manifest)


def checkpoints(out_dir: Path) -> list[Checkpoint]:
    """Every ``checkpoint-*`` folder of ``out_dir``, newest first."""
    if not out_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in out_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)


def check_checkpoint_dir(path: Path) -> Checkpoint:
    """An explicit ``--resume DIR``: a complete checkpoint, or a ``UsageError`` that says what is wrong."""
    if not path.is_dir():
        raise UsageError(f"--resume {path}: no such directory (pass a checkpoint-NNNNNN folder, or --resume auto)")
    if not (path / STATE_FILE).exists() and not (path / MANIFEST).exists():
        raise UsageError(f"--resume {path}: not a checkpoint folder (no {STATE_FILE}); pass a checkpoint-NNNNNN folder")
    ckpt = inspect_checkpoint(path)
    if ckpt.problem:
        raise UsageError(f"--resume {path}: the checkpoint cannot be used: {ckpt.problem}")
    if ckpt.manifest.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path}: checkpoint format {ckpt.manifest.get('format')!r} is not supported")
    return ckpt


# ------------------------------------------------------------------ the plan of a run
@dataclass
class RunPlan:
    out_dir: Path
    run_id: str
    fingerprint: str
    fresh: bool
    """No run of this config in ``out_dir`` yet (or ``--overwrite``): start at step 0 unless ``candidates``."""
    overwrite: bool = False
    candidates: list[Checkpoint] = field(default_factory=list)
    """Complete checkpoints to resume from, newest first (the loader falls back along the list)."""
    warnings: list[str] = field(default_factory=list)
    finished: dict | None = None
    """The ``summary.json`` of this run when it has already finished the requested steps."""
    run: dict | None = None


def source_stamps(cfg: TrainConfig) -> dict:
    """Size and modification time of the local data files a run reads (a cheap 'did the data change')."""
    stamps = {}
    for source in (cfg.data, cfg.eval_data):
        path = Path(source) if source else None
        if path is None or not path.exists():
            continue
        files = (
            [path]
            if path.is_file()
            else [p for p in sorted(path.iterdir()) if p.suffix in (".jsonl", ".json", ".parquet")]
        )
        for f in files:
            st = f.stat()
            stamps[str(f)] = [st.st_size, st.st_mtime_ns]
    return stamps


def _contents(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _check_not_foreign(out: Path) -> None:
    """Refuse a non-empty directory that holds no catdpo-train run."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a directory")
    if (out / COMPARE_FILE).exists():
        raise UsageError(
            f"--output-dir {out} holds a --compare of three runs, not one run: pass another --output-dir, "
            "add --compare, or --overwrite"
        )
    names = _contents(out)
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UsageError(
            f"--output-dir {out} is not empty ({shown}) and holds no catdpo-train run (no {RUN_FILE}; "
            "perhaps from an older version): pass another --output-dir, or --overwrite to write there anyway"
        )


def _this_run_checkpoints(out: Path, run: dict, fp: str, plan: RunPlan) -> None:
    """The complete checkpoints of this run id and fingerprint, newest first; warnings for the others."""
    for ckpt in checkpoints(out):
        m = ckpt.manifest or {}
        if ckpt.problem:
            plan.warnings.append(f"skipping {ckpt.path}: {ckpt.problem}")
        elif m.get("run_id") != run.get("run_id") or m.get("fingerprint") != fp:
            plan.warnings.append(f"skipping {ckpt.path}: it belongs to another run")
        else:
            plan.candidates.append(ckpt)


def _target_step(cfg: TrainConfig, run: dict) -> int | None:
    """The step this config trains to, when known without the data (``None`` otherwise)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = run.get("steps_per_epoch")
    return cfg.epochs * per_epoch if per_epoch else None


def _finished(cfg: TrainConfig, run: dict, plan: RunPlan) -> dict | None:
    """The summary of this run if it has trained exactly the requested steps on unchanged data."""
    target = _target_step(cfg, run)
    newest = plan.candidates[0].step if plan.candidates else None
    if target is not None and newest is not None and newest > target:
        raise UsageError(
            f"--output-dir {plan.out_dir} holds this run trained to step {newest}, past the {target} steps asked "
            f"for: pass --max-steps {newest} or more, or --overwrite (or another --output-dir) for a shorter run"
        )
    if run.get("status") != "finished" or newest is None or newest != target:
        return None
    if run.get("sources") != source_stamps(cfg):
        return None  # the data files changed: resuming reloads them and checks their digest
    return read_json(plan.out_dir / "summary.json")


def _explicit_checkpoint(cfg: TrainConfig, fp: str) -> Checkpoint:
    ckpt = check_checkpoint_dir(Path(cfg.resume))
    if ckpt.manifest.get("fingerprint") != fp:
        diff = option_diff(ckpt.manifest.get("config", {}), dataclasses.asdict(cfg))
        raise UsageError(f"--resume {ckpt.path}: the checkpoint was made with other options ({diff})")
    return ckpt


def plan_run(cfg: TrainConfig) -> RunPlan:
    """What a run of ``cfg`` does in its output directory (reads only; raises ``UsageError``)."""
    out, fp = Path(cfg.output_dir), fingerprint(cfg)
    explicit = _explicit_checkpoint(cfg, fp) if cfg.resume not in (None, "auto") else None
    adopted = explicit.manifest["run_id"] if explicit else uuid.uuid4().hex[:12]
    if cfg.overwrite:
        return RunPlan(out, adopted, fp, fresh=True, overwrite=True, candidates=[explicit] if explicit else [])
    run = read_json(out / RUN_FILE)
    if run is None:
        _check_not_foreign(out)
        return RunPlan(out, adopted, fp, fresh=True, candidates=[explicit] if explicit else [])
    if run.get("program") != PROGRAM or "fingerprint" not in run:
        raise UsageError(f"{out / RUN_FILE} is not a catdpo-train run file: pass another --output-dir, or --overwrite")
    if run["fingerprint"] != fp:
        raise UsageError(
            f"--output-dir {out} holds another run ({option_diff(run.get('config', {}), dataclasses.asdict(cfg))}): "
            "pass another --output-dir, or --overwrite to replace it"
        )
    if cfg.resume is None:
        raise UsageError(
            f"--output-dir {out} already holds this run: --resume auto continues it, --overwrite starts it again"
        )
    plan = RunPlan(out, run["run_id"], fp, fresh=False, run=run)
    if explicit is not None:
        plan.candidates = [explicit]
    else:
        _this_run_checkpoints(out, run, fp, plan)
    plan.finished = _finished(cfg, run, plan)
    return plan


# ------------------------------------------------------------------ writing run.json
def remove_outputs(out: Path, names=RUN_OUTPUTS) -> None:
    """``--overwrite``: delete what catdpo-train wrote there (its files and checkpoints), nothing else."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_dir() and (CHECKPOINT_NAME.match(p.name) or PARTIAL_NAME.match(p.name)):
            shutil.rmtree(p)
        elif p.name in names:
            p.unlink()


def claim(cfg: TrainConfig, plan: RunPlan) -> None:
    """Rank 0, before anything else is written: (``--overwrite``: clear the old outputs,) write ``run.json``."""
    if plan.overwrite:
        remove_outputs(plan.out_dir)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    run = dict(plan.run or {})
    run.update(
        program=PROGRAM,
        run_id=plan.run_id,
        fingerprint=plan.fingerprint,
        config=dataclasses.asdict(cfg),
        status="running",
        started=run.get("started", time.time()),
        sources=source_stamps(cfg),
    )
    write_json_atomic(plan.out_dir / RUN_FILE, run)
    plan.run = run


def release(plan: RunPlan) -> None:
    """A fresh run that stopped at a user mistake before training: un-claim the directory, so that the
    corrected command is not refused as 'another run'."""
    remove_outputs(plan.out_dir)
    with contextlib.suppress(OSError):
        plan.out_dir.rmdir()  # only if it is empty: it was made for this run


def mark_finished(plan: RunPlan, steps: int, steps_per_epoch: int) -> None:
    run = dict(plan.run or {}, status="finished", steps=steps, steps_per_epoch=steps_per_epoch, finished=time.time())
    write_json_atomic(plan.out_dir / RUN_FILE, run)
    plan.run = run


# ------------------------------------------------------------------ --compare
def plan_compare(cfg: TrainConfig) -> None:
    """Refuse a top-level ``--compare`` directory that holds something else (the three runs check themselves)."""
    out = Path(cfg.output_dir)
    if cfg.overwrite or not out.exists() or (out / COMPARE_FILE).exists():
        return
    if (out / RUN_FILE).exists():
        raise UsageError(
            f"--output-dir {out} holds a single run, not a --compare: pass another --output-dir, or --overwrite"
        )
    if _contents(out):
        raise UsageError(
            f"--output-dir {out} is not empty and holds no catdpo-train --compare: pass another --output-dir, "
            "or --overwrite to write there anyway"
        )


def claim_compare(cfg: TrainConfig, loss_types) -> None:
    """Write ``compare.json`` (``--overwrite``: after removing the old comparison's files)."""
    out = Path(cfg.output_dir)
    if cfg.overwrite:
        remove_outputs(out, COMPARE_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / COMPARE_FILE, dict(program=PROGRAM, kind="compare", loss_types=list(loss_types)))
