"""The checks ``catdpo-train`` runs on its options before any heavy work.

Every user mistake becomes one ``UsageError`` whose message names the option
and says what to do; the command line prints it as one ``error: ...`` line and
exits with status 2. The option checks and the path checks import neither torch
nor the data layer (they run in a fraction of a second); only ``check_device``
imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import typing
from pathlib import Path
from urllib.parse import urlparse

from ..hub_names import looks_like_hub_name
from .config import TrainConfig

DEFAULT_OUTPUT_DIR = "outputs/catdpo-train"
DEFAULT_COMPARE_OUTPUT_DIR = "outputs/catdpo-compare"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


class UsageError(ValueError):
    """A user mistake: ``catdpo-train`` prints it as one ``error: ...`` line and exits with status 2."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (field, test, what it must be); every float field is also checked to be finite.
_RULES = (
    ("eval_fraction", lambda v: 0 < v < 1, "in (0, 1) (the share of a single --data file held out)"),
    ("beta", lambda v: v > 0, "> 0"),
    ("safedpo_margin", lambda v: v >= 0, ">= 0"),
    ("margin_lr", lambda v: v >= 0, ">= 0 (0: the margins never move)"),
    ("margin_target", lambda v: 0 <= v <= 1, "a rate in [0, 1]"),
    ("margin_ema", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("margin_min_count", lambda v: v >= 0, ">= 0"),
    ("margin_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("lr", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("max_train_pairs", lambda v: v is None or v >= 1, ">= 1"),
    ("max_eval_pairs", lambda v: v is None or v >= 1, ">= 1"),
    ("max_length", lambda v: v >= 2, ">= 2"),
    ("max_prompt_length", lambda v: v >= 1, ">= 1"),
    ("hidden_size", lambda v: v >= 1, ">= 1"),
    ("num_layers", lambda v: v >= 1, ">= 1"),
    ("num_heads", lambda v: v >= 1, ">= 1"),
    ("intermediate_size", lambda v: v >= 1, ">= 1"),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("max_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("threads", lambda v: v is None or v >= 1, ">= 1"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("eval_every", lambda v: v >= 0, ">= 0 (0: evaluate at the end only)"),
    ("save_every", lambda v: v >= 0, ">= 0 (0: save at the end only)"),
)


def _check_types(cfg: TrainConfig) -> None:
    """Each field holds its annotated type (the API takes any object); floats are finite."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        kinds = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if value is None and type(None) in typing.get_args(hints[f.name]):
            continue
        kind = kinds[0]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"{flag(f.name)} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            # nan compares false with everything: --max-grad-norm nan silently turned clipping off
            raise UsageError(f"{flag(f.name)} must be a finite number, got {value!r}")
        choices = f.metadata.get("argparse", {}).get("choices")
        if choices and value not in choices:
            raise UsageError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")


def check_options(cfg: TrainConfig) -> None:
    """Types, ranges and combinations of the options (no torch, no file system)."""
    _check_types(cfg)
    for name, test, what in _RULES:
        value = getattr(cfg, name)
        if not test(value):
            raise UsageError(f"{flag(name)} must be {what}, got {value!r}")
    if cfg.max_length <= cfg.max_prompt_length:
        raise UsageError(
            f"--max-length {cfg.max_length} leaves no room for a response after --max-prompt-length "
            f"{cfg.max_prompt_length} (max-length counts prompt + response tokens): raise --max-length "
            "or lower --max-prompt-length"
        )
    if cfg.margin_min > cfg.margin_max:
        raise UsageError(f"--margin-min {cfg.margin_min} is above --margin-max {cfg.margin_max}")
    if not cfg.margin_min <= cfg.margin_init <= cfg.margin_max:
        raise UsageError(f"--margin-init {cfg.margin_init} is outside [--margin-min, --margin-max]")
    if cfg.model is None and cfg.hidden_size % cfg.num_heads:
        raise UsageError(f"--hidden-size {cfg.hidden_size} must be a multiple of --num-heads {cfg.num_heads}")
    if cfg.inplace_backward and cfg.head != "logits":
        raise UsageError("--inplace-backward applies to --head logits (the fused head never builds logits)")
    if cfg.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")


def normalize(cfg: TrainConfig, compare: bool = False) -> TrainConfig:
    """``~`` expanded in every path, the default output directory filled in, ``--resume no`` as ``None``."""

    def expand(value):
        return None if value is None else os.path.expanduser(value)

    default_out = DEFAULT_COMPARE_OUTPUT_DIR if compare else DEFAULT_OUTPUT_DIR
    resume = cfg.resume
    if resume is not None and resume.strip().lower() in ("no", "none", "never", ""):
        resume = None
    elif resume is not None and resume != "auto":
        resume = expand(resume)
    return dataclasses.replace(
        cfg,
        data=expand(cfg.data),
        eval_data=expand(cfg.eval_data),
        model=expand(cfg.model),
        output_dir=expand(cfg.output_dir) or default_out,
        resume=resume,
    )


# ------------------------------------------------------------------ data and model paths


def _split_file(directory: Path, split: str) -> Path | None:
    return next(
        (directory / f"{split}{ext}" for ext in DATA_EXTENSIONS if (directory / f"{split}{ext}").is_file()), None
    )


def check_source(option: str, source: str | None, splits: tuple[str, ...]) -> None:
    """A data source exists: a file, a directory with a file per split, or a reachable hub data set."""
    if source is None:
        return
    if not source.strip():
        raise UsageError(f"{option} is empty: pass a data file, a directory or a hub data set name")
    path = Path(source)
    if path.is_dir():
        for split in splits:
            if _split_file(path, split) is None:
                raise UsageError(
                    f"{option} {source}: the directory holds no {split}.jsonl, {split}.json or {split}.parquet "
                    "(one file per split; see --train-split / --eval-split, or pass the file itself)"
                )
        return
    if path.is_file():
        return
    if not looks_like_hub_name(source):
        raise UsageError(f"{option} {source}: no such file or directory")
    check_hub_reachable(option, source)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_reachable(option: str, name: str, timeout: float = 5.0) -> None:
    """Fail in a second, not after ``datasets``' ~30 s of retries, when the hub cannot be reached.

    With ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, a cached copy is used and ``datasets``
    reports a miss itself.
    """
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UsageError(
            f"{option} {name}: no such local file or directory, and as a hub data set name it needs "
            f"{endpoint.hostname}, which cannot be reached ({e.strerror or e}); download the data set where "
            "there is network and pass its directory, or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def check_paths(cfg: TrainConfig) -> None:
    """``--data``, ``--eval-data``, ``--model`` and an explicit ``--resume`` exist."""
    single_file = cfg.data is not None and Path(cfg.data).is_file()
    held_out_from_data = cfg.eval_data is None and not single_file
    check_source("--data", cfg.data, (cfg.train_split, cfg.eval_split) if held_out_from_data else (cfg.train_split,))
    check_source("--eval-data", cfg.eval_data, (cfg.eval_split,))
    if cfg.model is not None and not (Path(cfg.model) / "config.json").is_file():
        what = "holds no config.json" if Path(cfg.model).is_dir() else "is not a directory"
        raise UsageError(
            f"--model {cfg.model} {what}: catdpo-train loads a local Hugging Face model directory "
            "(save_pretrained output); download the model first"
        )
    if cfg.resume not in (None, "auto"):
        from .rundir import check_checkpoint_dir

        check_checkpoint_dir(Path(cfg.resume))


# ------------------------------------------------------------------ device and backend
def check_device(cfg: TrainConfig) -> None:
    """``--device`` exists and ``--backend`` can run on it (imports torch only when that needs it)."""
    if not cfg.device.startswith("cuda") and cfg.backend != "triton":
        return  # the CPU is always there, and auto falls back to it
    import torch

    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: no CUDA device is visible to torch; use --device cpu (or auto)")
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.backend == "triton":
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError(
                "--backend triton needs a CUDA device and this run is on the CPU; use --backend auto (torch on CPU)"
            )
        from ..backends import triton_available

        if not triton_available():
            raise UsageError("--backend triton needs the triton package (pip install triton); or use --backend auto")


def validate(cfg: TrainConfig, compare: bool = False) -> TrainConfig:
    """All of the above; returns the normalised config. Raises ``UsageError``."""
    cfg = normalize(cfg, compare)
    check_options(cfg)
    if compare and cfg.resume not in (None, "auto"):
        raise UsageError("--compare trains three runs: --resume takes auto or no there, not a checkpoint")
    check_paths(cfg)
    check_device(cfg)
    return cfg
