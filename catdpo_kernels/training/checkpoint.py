"""Checkpoints: ``checkpoint-NNNNNN/`` (``state.pt``, the word-level tokenizer, the ``COMPLETE`` manifest).

``state.pt`` holds ``model``, ``optimizer``, ``scheduler``, ``margins``
(``CategoryMargins.state_dict()``), ``step``, ``train_seconds``, ``rng`` (Python,
NumPy, torch and CUDA generators), ``config``, ``evals``, ``history`` and
``world_size``; without ``--model`` also ``reference`` (the frozen initial
policy), and with ``--precompute-ref`` the ``ref_logps`` of both splits. It holds
plain containers, numbers, strings and tensors only, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code.

**Atomic saves.** Everything is written into a hidden ``.checkpoint-N.tmp-PID``
folder and fsynced; the ``COMPLETE`` manifest (run id, fingerprint, data digest,
step, the size of every file) is written last; then the folder is renamed to
``checkpoint-N`` and its parent fsynced. A crash at any point leaves either no
``checkpoint-N`` or a complete one; a leftover temporary folder is removed by the
next save. ``--resume auto`` takes the newest complete checkpoint of the run, and
falls back to an older one (with a warning) when a file turns out to be
unreadable.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import TrainConfig, fingerprint
from .rundir import CHECKPOINT_FORMAT, MANIFEST, PARTIAL_NAME, STATE_FILE, Checkpoint, RunPlan, fsync_dir
from .validate import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .job import Job

# Test hook (tests/test_training_faults.py): "STEP:SECONDS" makes the save of that step sleep after
# writing its files and before the rename that publishes it, so a test can kill the process there.
SAVE_DELAY_ENV = "CATDPO_TEST_SAVE_DELAY"


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded (cut short by a crash, or not a checkpoint of this program)."""


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Every generator's state as plain data (``weights_only``-loadable: NumPy's array becomes a list)."""
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state = dict(
        python=random.getstate(),
        numpy=dict(
            bit_generator=np_state["bit_generator"],
            key=np_state["state"]["key"].tolist(),
            pos=int(np_state["state"]["pos"]),
            has_gauss=int(np_state["has_gauss"]),
            gauss=float(np_state["gauss"]),
        ),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ loading
def load_state(ckpt: Path) -> dict:
    """``state.pt`` of a checkpoint, loaded with ``weights_only=True``; ``CheckpointError`` naming it if unreadable."""
    path = ckpt / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} is missing") from None
    except Exception as e:  # a truncated zip, an EOF, a pickle of something else: all mean "unusable"
        raise CheckpointError(
            f"checkpoint {ckpt}: {STATE_FILE} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it was probably cut short by a crash: resume from an older checkpoint or start again (--overwrite)"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} is not a catdpo-train checkpoint")
    return state


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_resume_state(plan: RunPlan, explicit: bool) -> tuple[Checkpoint | None, dict | None]:
    """``(checkpoint, state)`` to resume from, or ``(None, None)`` for a run from step 0.

    An explicit ``--resume DIR`` that cannot be loaded is an error; ``--resume auto`` falls
    back to the next older complete checkpoint of the run, with a warning.
    """
    for ckpt in plan.candidates:
        try:
            return ckpt, load_state(ckpt.path)
        except CheckpointError as e:
            if explicit:
                raise
            warn(f"skipping {ckpt.path}: {e}")
    if plan.candidates:
        warn(f"no usable checkpoint in {plan.out_dir}: starting this run again from step 0")
    return None, None


# ------------------------------------------------------------------ saving
def _state_blob(job: Job) -> dict:
    """Everything a resumed run restores, as ``weights_only``-loadable plain data."""
    import dataclasses

    blob = dict(
        model=job.policy.state_dict(),
        optimizer=job.optimizer.state_dict(),
        scheduler=job.scheduler.state_dict(),
        margins=job.margins.state_dict(),
        step=job.step,
        train_seconds=job.train_seconds(),
        rng=rng_state(),
        config=dataclasses.asdict(job.cfg),
        evals=job.evals,
        history=job.history,
        world_size=job.world,
    )
    if job.cfg.model is None:
        blob["reference"] = job.ref_model.state_dict()
    if job.cfg.precompute_ref:
        blob["ref_logps"] = (job.train_split.ref_logps, job.held_split.ref_logps)
    return blob


def _fsync_tree(folder: Path) -> dict:
    """fsync every file of ``folder`` (and the folder); ``{name: size}``."""
    sizes = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        sizes[f.name] = f.stat().st_size
    fsync_dir(folder)
    return sizes


def _write_manifest(tmp: Path, job: Job, sizes: dict) -> None:
    import dataclasses
    import json

    manifest = dict(
        format=CHECKPOINT_FORMAT,
        run_id=job.plan.run_id,
        fingerprint=fingerprint(job.cfg),
        data_digest=job.data_digest,
        step=job.step,
        files=sizes,
        config=dataclasses.asdict(job.cfg),
        written=time.time(),
    )
    with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)


def _test_delay(step: int) -> None:
    spec = os.environ.get(SAVE_DELAY_ENV)
    if spec and int(spec.split(":")[0]) == step:
        print(f"[test] checkpoint {step} written, waiting before the rename", file=sys.stderr, flush=True)
        time.sleep(float(spec.split(":")[1]))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place (replacing an older save of the same step) and sync the parent."""
    old = None
    if final.exists():  # a re-save of the same step: move the old one aside first (rename is atomic)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_partial_saves(out_dir: Path) -> None:
    """Temporary folders of saves that a crash interrupted."""
    for p in out_dir.iterdir():
        if p.is_dir() and PARTIAL_NAME.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(job: Job) -> Path | None:
    """Write ``checkpoint-<step>/`` atomically (rank 0 only; ``None`` elsewhere)."""
    if not job.is_main:
        return None
    final = job.out_dir / f"checkpoint-{job.step:06d}"
    _remove_partial_saves(job.out_dir)
    tmp = job.out_dir / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    torch.save(_state_blob(job), tmp / STATE_FILE)
    if job.cfg.model is None:
        job.tokenizer.save_pretrained(str(tmp))
    _write_manifest(tmp, job, _fsync_tree(tmp))
    _test_delay(job.step)
    _publish(tmp, final)
    return final


def restore_progress(job: Job, state: dict) -> None:
    """Optimiser, scheduler, step, evaluations, margin history, elapsed time and RNG state of a checkpoint.

    (The model, the reference, the margins and the precomputed reference log-probs are
    restored while the job is built.)
    """
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.step = int(state["step"])
    job.seconds_before = float(state.get("train_seconds", 0.0))
    job.evals = list(state["evals"])
    job.history = list(state["history"])
    set_rng_state(state["rng"])


def describe(ckpt: Checkpoint, cfg: TrainConfig) -> str:
    total = f" of {cfg.max_steps}" if cfg.max_steps else ""
    return f"resuming from {ckpt.path} (step {ckpt.step}{total})"
