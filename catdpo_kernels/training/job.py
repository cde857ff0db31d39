"""``Job``: everything one training run holds, and ``build_job``, which sets it up (or restores it).

Set-up order (it fixes the random stream, so it is part of the results): load
the data, pick the checkpoint to resume from, seed, build the model and
tokenizer, tokenize, restore the checkpoint's weights, copy the reference, build
the criterion, precompute the reference log-probs, build the optimiser; a
resumed run finally restores the RNG state. (Loading the data and a checkpoint
draws no random number.)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as D
from .._ext import extension_source
from ..backends import resolve_backend
from ..margins import CategoryMargins
from ..modules import CatDPOLoss
from .batches import Split, load_splits, steps_per_epoch
from .checkpoint import describe, load_resume_state, restore_progress, seed_all
from .config import TrainConfig
from .criterion import make_criterion
from .distributed import pick_device, rank_world
from .model import build_model_and_tokenizer, build_reference, choose_head, reference_logps
from .report import RunLog
from .rundir import RunPlan
from .validate import UsageError


@dataclass
class Job:
    cfg: TrainConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    log: RunLog
    names: tuple[str, ...]
    train_split: Split
    held_split: Split
    data_digest: str
    tokenizer: object
    policy: torch.nn.Module
    model: torch.nn.Module
    """The policy, wrapped in ``DistributedDataParallel`` when ``world > 1``."""
    ref_model: torch.nn.Module
    criterion: CatDPOLoss
    head: str
    """``fused`` or ``logits``: how a batch becomes a loss (``model.batch_loss``)."""
    head_transform: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resumed: bool = False
    step: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0
    """Training seconds of the run before this process (a resumed run's clock continues from there)."""
    t_loop: float | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def margins(self) -> CategoryMargins:
        return self.criterion.margins

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def loop_ref_model(self) -> torch.nn.Module | None:
        """The reference the loop runs: none with ``--precompute-ref`` (the batches carry its log-probs)."""
        return None if self.cfg.precompute_ref else self.ref_model

    def train_seconds(self) -> float:
        """Seconds of training so far, this process's and those before a resume."""
        running = time.perf_counter() - self.t_loop if self.t_loop is not None else 0.0
        return self.seconds_before + running


def data_digest(*pair_lists) -> str:
    """A hash of the pairs' content: a resumed run must train on the data its checkpoint saw."""
    h = hashlib.sha256()
    for pairs in pair_lists:
        for p in pairs:
            item = [p.prompt, p.chosen, p.rejected, p.chosen_unsafe, p.rejected_unsafe, list(p.categories)]
            h.update(json.dumps(item).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def _load_data(cfg: TrainConfig, world: int, log: RunLog):
    """The transformed splits, or a ``UsageError`` that says what is wrong with the data or the batch shape."""
    try:
        (train_pairs, train_report), (held_pairs, held_report) = load_splits(cfg)
    except D.MalformedRowError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError, ImportError) as e:  # a missing file, an empty source, the hub out of reach
        raise UsageError(f"cannot read the data: {e}") from None
    need = cfg.batch_size * cfg.grad_accum * world
    if steps_per_epoch(len(train_pairs), cfg, world) == 0:
        raise UsageError(
            f"{len(train_pairs)} training pairs are too few for one optimiser step of {need} pairs "
            f"(--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} process(es)): "
            "lower --batch-size or --grad-accum, or give more data"
        )
    log(train_report.format("train"))
    log(held_report.format("held-out"))
    return (train_pairs, train_report), (held_pairs, held_report)


def _tokenize(cfg: TrainConfig, pairs, report, tok, log: RunLog, what: str) -> Split:
    """Tokenize a split; refuse one whose responses ``--max-length`` cuts to nothing, warn about a few."""
    tokenized = D.tokenize_pairs(pairs, tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    empty = sum(1 for t in tokenized if not t.chosen_ids or not t.rejected_ids)
    if empty == len(tokenized):
        raise UsageError(
            f"--max-length {cfg.max_length} cuts every {what} response to 0 tokens (prompts up to "
            f"--max-prompt-length {cfg.max_prompt_length}): raise --max-length"
        )
    if empty:
        log.warn(f"{empty} of {len(tokenized)} {what} pairs have a response cut to 0 tokens by --max-length")
    return Split(pairs, tokenized, report)


def _resume(cfg: TrainConfig, plan: RunPlan, digest: str, log: RunLog):
    """``(checkpoint folder, state)`` to resume from (``(None, None)``: from step 0)."""
    ckpt, state = load_resume_state(plan, explicit=cfg.resume not in (None, "auto"))
    if ckpt is None:
        return None, None
    saved = ckpt.manifest.get("data_digest")
    if saved is not None and saved != digest:
        raise UsageError(
            f"the data differ from those checkpoint {ckpt.path} was trained on: resume with the same data, "
            "or start again with --overwrite (or another --output-dir)"
        )
    log(describe(ckpt, cfg))
    return ckpt.path, state


def _models(cfg: TrainConfig, state, ckpt_dir, texts, device):
    """``(policy, tokenizer, reference)``, restored from ``state`` when resuming."""
    policy, tok = build_model_and_tokenizer(cfg, texts, ckpt_dir)
    policy.to(device)
    if state is not None:
        policy.load_state_dict(state["model"])
    return policy, tok, build_reference(policy, cfg, state, device)


def build_job(cfg: TrainConfig, plan: RunPlan, console: bool = True) -> Job:
    """Load the data, build (or restore) the models, the criterion and the optimiser."""
    t_start = time.perf_counter()
    rank, world = rank_world()
    device = pick_device(cfg.device)
    log = RunLog(plan.out_dir / "train.log" if rank == 0 else None, console=console and rank == 0 and not cfg.quiet)
    (train_pairs, train_report), (held_pairs, held_report) = _load_data(cfg, world, log)
    digest = data_digest(train_pairs, held_pairs)
    ckpt_dir, state = _resume(cfg, plan, digest, log)
    names = tuple(train_report.category_names)

    seed_all(cfg.seed)
    # The default word-level vocabulary covers the held-out text too (a vocabulary is not a label);
    # words only the held-out split uses keep their untrained embeddings.
    texts = [*D.pair_texts(train_pairs), *D.pair_texts(held_pairs)]
    policy, tok, ref_model = _models(cfg, state, ckpt_dir, texts, device)
    train_split = _tokenize(cfg, train_pairs, train_report, tok, log, "training")
    held_split = _tokenize(cfg, held_pairs, held_report, tok, log, "held-out")
    head, transform, note = choose_head(cfg, policy, ref_model)
    criterion = make_criterion(cfg, names, head, transform).to(device)
    if state is not None:
        criterion.margins.load_state_dict(state["margins"])
    if cfg.precompute_ref:
        _precompute_reference(cfg, state, ref_model, train_split, held_split, tok.pad_token_id, device, head, transform)
    _log_setup(log, cfg, policy, tok, device, world, head, note)
    model, optimizer, scheduler = _optimisation(cfg, policy, device, world)
    job = Job(
        cfg=cfg,
        plan=plan,
        rank=rank,
        world=world,
        device=device,
        log=log,
        names=names,
        train_split=train_split,
        held_split=held_split,
        data_digest=digest,
        tokenizer=tok,
        policy=policy,
        model=model,
        ref_model=ref_model,
        criterion=criterion,
        head=head,
        head_transform=transform,
        optimizer=optimizer,
        scheduler=scheduler,
        resumed=state is not None,
        t_start=t_start,
    )
    if state is not None:
        restore_progress(job, state)
    return job


def _log_setup(log: RunLog, cfg: TrainConfig, policy, tok, device, world: int, head: str, note: str | None) -> None:
    """The model, the device, the threads, the backend and head used, and the compiled extension."""
    n_params = sum(p.numel() for p in policy.parameters())
    log(
        f"model: {cfg.model or 'tiny random Llama'} ({n_params / 1e6:.2f}M params, vocab {len(tok)}), "
        f"device {device}, world size {world}, {torch.get_num_threads()} CPU thread(s)"
    )
    log(f"loss: {cfg.loss_type} on backend {resolve_backend(cfg.backend, device).name}, {head} head")
    if note:
        log(f"note: {note}")
    log(f"compiled extension: {extension_status()}")


def _precompute_reference(
    cfg, state, ref_model, train_split: Split, held_split: Split, pad_id, device, head, transform
) -> None:
    """``--precompute-ref``: both splits' reference log-probs, computed once (or taken from the checkpoint)."""
    if state is not None and "ref_logps" in state:
        train_split.ref_logps, held_split.ref_logps = state["ref_logps"]
        return
    num_categories = len(train_split.report.category_names)
    args = (cfg, pad_id, device, num_categories, head, transform)
    train_split.ref_logps = reference_logps(ref_model, train_split, *args)
    held_split.ref_logps = reference_logps(ref_model, held_split, *args)


def _optimisation(cfg: TrainConfig, policy, device: torch.device, world: int):
    """``(model, optimizer, scheduler)``: DDP around the policy when distributed, AdamW, linear warm-up."""
    model = policy
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    return model, optimizer, scheduler


def extension_status() -> str:
    """How the compiled segment-reduce op is provided: ahead of time, JIT, or the pure-torch fallback."""
    source = extension_source()
    return {
        "aot": "loaded (built at install)",
        "jit": "loaded (JIT-built)",
        "fallback": "not available, using the pure-torch fallback",
        "disabled": "disabled (CATDPO_DISABLE_EXT)",
    }.get(source, source)
