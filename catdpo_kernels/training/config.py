"""``TrainConfig``: every option of ``catdpo-train``, declared once.

Each field is also a command-line option: ``--field-name`` (dashes for
underscores), its type from the annotation, its default from the field, and its
help text and choices from the field's metadata. A ``bool`` field that defaults
to ``False`` is a ``--flag``; one that defaults to ``True`` is a ``--no-flag``.

This module imports neither torch nor the data layer: ``catdpo-train --help``
builds its parser from it and must answer at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field

from ..constants import LOSS_TYPES

# A copy of ``catdpo_kernels.data.PREFERENCE_KEYS``: importing ``data`` imports torch (through
# ``categories``), which ``--help`` must not pay for. tests/test_training_cli.py keeps them equal.
PREFERENCE_KEYS = ("better_response_id", "safer_response_id")
COMPARE_LOSS_TYPES = ("dpo", "safedpo", "catdpo")
BACKEND_CHOICES = ("auto", "triton", "torch", "reference")
HEAD_CHOICES = ("fused", "logits")
ON_OFF = ("auto", "on", "off")
TINY = "tiny default model only"


def option(default, help: str | None = None, **argparse_kwargs):
    """A ``TrainConfig`` field that is also the command-line option ``--field-name``."""
    return field(default=default, metadata=dict(help=help, argparse=argparse_kwargs))


@dataclass
class TrainConfig:
    """Every option of ``catdpo-train`` (the CLI flag is the field name with dashes)."""

    # model and data
    model: str | None = option(
        None,
        "local Hugging Face causal-LM directory (default: a tiny random Llama with a "
        "word-level tokenizer trained on the data; nothing is downloaded)",
    )
    data: str | None = option(
        None,
        "PKU-SafeRLHF-schema data: a directory with train/test .jsonl or .parquet, a "
        "single file (held-out split carved with --eval-fraction), or a hub data set name "
        "(default: the bundled sample)",
    )
    eval_data: str | None = option(None, "held-out data (same forms as --data)")
    data_config: str | None = option(None, "hub configuration, e.g. alpaca3-8b")
    train_split: str = option("train")
    eval_split: str = option("test")
    eval_fraction: float = option(0.2, "held-out fraction when --data is a single file and --eval-data is not given")
    on_bad_rows: str = option(
        "raise",
        "malformed rows: raise a clear error listing them (default) or skip and report them",
        choices=("raise", "skip"),
    )
    preference_key: str = option(
        "better_response_id", "which preference picks the winner before the SafeDPO transform", choices=PREFERENCE_KEYS
    )
    max_train_pairs: int | None = option(None, "use at most this many training pairs (default: all)")
    max_eval_pairs: int | None = option(None, "use at most this many held-out pairs (default: all)")
    max_length: int = option(256, "tokens of prompt + response; a longer response is cut")
    max_prompt_length: int = option(128, "prompt tokens (the end of a longer prompt is kept)")
    hidden_size: int = option(64, TINY)
    num_layers: int = option(2, TINY)
    num_heads: int = option(4, TINY)
    intermediate_size: int = option(128, TINY)
    # loss
    loss_type: str = option("catdpo", "the preference loss", choices=LOSS_TYPES)
    backend: str = option("auto", "loss kernels: auto is triton on CUDA, torch on the CPU", choices=BACKEND_CHOICES)
    head: str = option(
        "fused",
        "fused: the loss from the last hidden states and the output embedding, never building the logits; "
        "logits: from the model's full logits (models the fused head cannot run fall back to it)",
        choices=HEAD_CHOICES,
    )
    beta: float = option(0.1, "DPO's inverse temperature: z = beta*h - s*margin")
    safedpo_margin: float = option(0.5, "SafeDPO's global margin")
    average_log_prob: bool = option(False)
    reduction: str = option("mean", choices=("mean", "sum", "category_mean"))
    inplace_backward: bool = option(
        False, "--head logits only: write the logits gradient into the logits buffer (saves a (2B,T,V) allocation)"
    )
    # CategoryMargins (defaults are CategoryMargins' own)
    margin_init: float = option(0.5)
    margin_lr: float = option(0.5, "dual step size eta")
    margin_target: float = option(0.1, "tolerated unsafe rate epsilon")
    margin_ema: float = option(0.9)
    margin_min_count: float = option(1.0)
    margin_warmup_steps: int = option(0)
    margin_min: float = option(0.0)
    margin_max: float = option(5.0)
    margin_mode: str = option("absolute", choices=("absolute", "relative"))
    margin_signal: str = option("soft", choices=("soft", "hard"))
    # optimisation
    epochs: int = option(3, "passes over the training pairs")
    max_steps: int | None = option(None, "optimiser steps (overrides --epochs)")
    batch_size: int = option(16, "pairs per micro-batch per rank")
    grad_accum: int = option(1)
    lr: float = option(1e-3)
    weight_decay: float = option(0.0)
    warmup_steps: int = option(0)
    max_grad_norm: float = option(1.0, "gradient-norm clipping (0: no clipping)")
    precompute_ref: bool = option(False, "compute the reference log-probs once up front and drop the reference model")
    bf16: str = option("auto", "bf16 autocast (auto: on CUDA)", choices=ON_OFF)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(
        None,
        "intra-op CPU threads (default: OMP_NUM_THREADS / MKL_NUM_THREADS if set, else one per idle core; "
        "train() called from Python leaves torch's setting alone)",
    )
    seed: int = option(0)
    # bookkeeping
    output_dir: str | None = option(
        None, "where the run writes (default: outputs/catdpo-train; with --compare outputs/catdpo-compare)"
    )
    eval_every: int = option(10, "held-out evaluation every N steps (0: at the end only)")
    save_every: int = option(0, "checkpoint every N steps (0: at the end only)")
    resume: str | None = option(
        "auto",
        "auto (default): continue this run from its newest complete checkpoint in --output-dir, or report "
        "that it has finished; a checkpoint-* directory; or 'no'",
    )
    overwrite: bool = option(
        False,
        "start again although --output-dir holds another run (or other files): that run's outputs are removed "
        "(only files catdpo-train writes)",
    )
    progress: bool = option(True, "hide the progress bar")
    plot: bool = option(True, "skip margins.png (and compare.png)")
    quiet: bool = option(False, "print warnings and errors only (train.log keeps everything)")


# The first field of each argument group of ``--help``.
GROUPS = {
    "model": "model and data",
    "loss_type": "loss",
    "margin_init": "category margins (catdpo)",
    "epochs": "optimisation",
    "output_dir": "outputs",
}

# Options that may differ between a checkpoint and the run that resumes it.
RESUME_FREE = frozenset(
    {
        "max_steps",
        "epochs",
        "output_dir",
        "eval_every",
        "save_every",
        "resume",
        "progress",
        "plot",
        "quiet",
        "backend",
        "head",
        "device",
        "bf16",
        "threads",
        "overwrite",
    }
)


def _base_type(hint):
    """``int`` for ``int | None`` (and for ``int``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(f: dataclasses.Field) -> str | None:
    """The field's help text, with its default where the text does not give one already."""
    text = f.metadata.get("help") or ""
    if f.default is None or isinstance(f.default, bool) or "default" in text:
        return text or None
    return f"{text} (default: {f.default})".strip()


def add_arguments(parser) -> None:
    """The ``catdpo-train`` options, one per ``TrainConfig`` field, plus ``--compare`` and ``--debug``."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            group = parser.add_argument_group(GROUPS[f.name])
        kwargs = dict(f.metadata.get("argparse", {}), help=_help(f))
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool and f.default:
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", **kwargs)
        elif kind is bool:
            group.add_argument(flag, action="store_true", **kwargs)
        else:
            group.add_argument(flag, type=kind, default=f.default, **kwargs)
    group.add_argument(
        "--compare",
        action="store_true",
        help="train dpo, safedpo and catdpo with one seed and data; print one table, write compare.png",
    )
    group.add_argument("--debug", action="store_true", help="show the traceback of an error")


def config_from_args(ns) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (anything that is not a field, e.g. ``compare``, is left out)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields})


def trajectory_options(cfg: TrainConfig | dict) -> dict:
    """The options that decide a run's results (all but ``RESUME_FREE``: not the step count, not the outputs)."""
    values = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    return {k: v for k, v in sorted(values.items()) if k not in RESUME_FREE}


def fingerprint(cfg: TrainConfig | dict) -> str:
    """A short hash of ``trajectory_options``: two runs with one fingerprint train the same way.

    (The data's content is checked apart, by a digest of the loaded pairs.)
    """
    text = json.dumps(trajectory_options(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def option_diff(old: dict, new: dict) -> str:
    """``--lr 0.001 -> 0.5, --seed 0 -> 1``: the trajectory options that differ between two configs."""
    a, b = trajectory_options(old), trajectory_options(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"--{k.replace('_', '-')} {a.get(k)!r} -> {b.get(k)!r}" for k in keys)
