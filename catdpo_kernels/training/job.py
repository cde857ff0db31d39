"""``Job``: everything one training run holds, and ``build_job``, which sets it up (or restores it).

Set-up order (it fixes the random stream, so it is part of the results): load
the data, seed, build the model and tokenizer, tokenize, restore the checkpoint's
weights, copy the reference, build the criterion, precompute the reference
log-probs, build the optimiser; a resumed run finally restores the RNG state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as D
from .._ext import extension_source
from ..backends import resolve_backend
from ..margins import CategoryMargins
from ..modules import CatDPOLoss
from .batches import Split, load_splits
from .checkpoint import load_resume_state, restore_progress, seed_all
from .config import TrainConfig
from .criterion import make_criterion
from .distributed import pick_device, rank_world
from .model import build_model_and_tokenizer, build_reference, choose_head, reference_logps


@dataclass
class Job:
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    log: Callable[..., None]
    names: tuple[str, ...]
    train_split: Split
    held_split: Split
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


def build_job(cfg: TrainConfig) -> Job:
    """Load the data, build (or restore) the models, the criterion and the optimiser."""
    t_start = time.perf_counter()
    rank, world = rank_world()
    device = pick_device(cfg.device)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 and not cfg.quiet else (lambda *a: None)
    ckpt_dir, state = load_resume_state(cfg)
    (train_pairs, train_report), (held_pairs, held_report) = load_splits(cfg)
    log(train_report.format("train"))
    log(held_report.format("held-out"))
    names = tuple(train_report.category_names)

    seed_all(cfg.seed)
    # The default word-level vocabulary covers the held-out text too (a vocabulary is not a label);
    # words only the held-out split uses keep their untrained embeddings.
    policy, tok = build_model_and_tokenizer(cfg, [*D.pair_texts(train_pairs), *D.pair_texts(held_pairs)], ckpt_dir)
    tk = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_split = Split(train_pairs, D.tokenize_pairs(train_pairs, tok, **tk), train_report)
    held_split = Split(held_pairs, D.tokenize_pairs(held_pairs, tok, **tk), held_report)
    policy.to(device)
    if state is not None:
        policy.load_state_dict(state["model"])
    ref_model = build_reference(policy, cfg, state, device)
    head, transform, note = choose_head(cfg, policy, ref_model)
    criterion = make_criterion(cfg, names, head, transform).to(device)
    if state is not None:
        criterion.margins.load_state_dict(state["margins"])
    if cfg.precompute_ref:
        _precompute_reference(cfg, state, ref_model, train_split, held_split, tok.pad_token_id, device, head, transform)

    n_params = sum(p.numel() for p in policy.parameters())
    log(
        f"model: {cfg.model or 'tiny random Llama'} ({n_params / 1e6:.2f}M params, vocab {len(tok)}), "
        f"device {device}, world size {world}"
    )
    log(f"loss: {cfg.loss_type} on backend {resolve_backend(cfg.backend, device).name}, {head} head")
    if note:
        log(f"note: {note}")
    log(f"compiled extension: {extension_status()}")
    model, optimizer, scheduler = _optimisation(cfg, policy, device, world)
    job = Job(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        log=log,
        names=names,
        train_split=train_split,
        held_split=held_split,
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
