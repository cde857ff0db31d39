"""Checkpoints: ``checkpoint-NNNNNN/state.pt`` (+ the word-level tokenizer), and exact resume.

``state.pt`` holds ``model``, ``optimizer``, ``scheduler``, ``margins``
(``CategoryMargins.state_dict()``), ``step``, ``rng`` (Python, NumPy, torch and
CUDA generators), ``config``, ``evals``, ``history`` and ``world_size``; without
``--model`` also ``reference`` (the frozen initial policy), and with
``--precompute-ref`` the ``ref_logps`` of both splits. A resumed run restores all
of it and skips the steps already trained on, so it continues exactly where the
checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import RESUME_FREE, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from .job import Job


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*/state.pt"))
    return ckpts[-1].parent if ckpts else None


def rng_state() -> dict:
    import numpy as np

    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_resume_state(cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """``(checkpoint directory, state.pt contents)`` for ``--resume``, or ``(None, None)``.

    A checkpoint made with other trajectory-defining options (all but ``RESUME_FREE``) is refused.
    """
    if not cfg.resume:
        return None, None
    ckpt_dir = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume != "auto" and not (ckpt_dir / "state.pt").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no state.pt there")
    if ckpt_dir is None:  # --resume auto with no checkpoint yet: a fresh run
        return None, None
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    diff = {
        k: (state["config"].get(k), v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in RESUME_FREE and state["config"].get(k) != v
    }
    if diff:
        raise ValueError(f"--resume {ckpt_dir}: the checkpoint was made with other options {diff} (old, new)")
    return ckpt_dir, state


def save_checkpoint(job: Job) -> Path | None:
    """Write ``checkpoint-<step>/`` (rank 0 only; ``None`` elsewhere)."""
    if not job.is_main:
        return None
    path = job.out_dir / f"checkpoint-{job.step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    blob = dict(
        model=job.policy.state_dict(),
        optimizer=job.optimizer.state_dict(),
        scheduler=job.scheduler.state_dict(),
        margins=job.margins.state_dict(),
        step=job.step,
        rng=rng_state(),
        config=dataclasses.asdict(job.cfg),
        evals=job.evals,
        history=job.history,
        world_size=job.world,
    )
    if job.cfg.model is None:
        blob["reference"] = job.ref_model.state_dict()
        job.tokenizer.save_pretrained(str(path))
    if job.cfg.precompute_ref:
        blob["ref_logps"] = (job.train_split.ref_logps, job.held_split.ref_logps)
    torch.save(blob, path / "state.pt")
    return path


def restore_progress(job: Job, state: dict) -> None:
    """Optimiser, scheduler, step, evaluations, margin history and RNG state of a checkpoint.

    (The model, the reference, the margins and the precomputed reference log-probs are
    restored while the job is built.)
    """
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.step = int(state["step"])
    job.evals = list(state["evals"])
    job.history = list(state["history"])
    set_rng_state(state["rng"])
