"""Cat-DPO training of a causal LM end to end: the program behind ``catdpo-train``.

``train(TrainConfig(...))`` runs one training job; ``compare(config)`` runs
``dpo``, ``safedpo`` and ``catdpo`` with one seed and one data set and prints a
side-by-side table; ``main(argv)`` is the command line
(``python -m catdpo_kernels.training``, ``torchrun -m catdpo_kernels.training``).

Defaults (no argument at all): the bundled PKU-SafeRLHF-schema sample, a
word-level tokenizer trained on it at start-up (no download), a tiny randomly
initialised Llama (hidden 64, 2 layers), CPU.

Running the same job again (same options, same ``output_dir``) resumes it from
its last complete checkpoint, or, once it has finished, reports it and trains
nothing; ``overwrite=True`` starts again. A user mistake raises
``validate.UsageError`` (the command line prints it as one ``error:`` line).

Modules, one job each:

* ``config``: ``TrainConfig`` and the command-line options generated from it;
* ``validate``: the checks of the options, the paths and the device, before any heavy work;
* ``rundir``: the output directory: run id and fingerprint, complete checkpoints, what a rerun does;
* ``distributed``: process group, rank, device;
* ``batches``: the train/held-out splits, the step schedule, collation;
* ``model``: the policy, the tokenizer, the frozen reference, the forward;
* ``criterion``: the run's ``CatDPOLoss`` and its margins;
* ``job``: everything one run holds, built (or restored) in one place;
* ``loop``: the optimiser steps, ``train`` and ``compare``;
* ``evaluation``: the held-out per-category evaluation;
* ``report``: ``metrics.jsonl``, ``train.log``, the tables, the progress bar;
* ``plots``: ``margins.png`` and ``compare.png``;
* ``checkpoint``: atomic saves, resume, RNG state;
* ``cli``: ``catdpo-train``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"TrainConfig": "config", "train": "loop", "compare": "loop", "main": "cli"}

__all__ = ["TrainConfig", "compare", "main", "train"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .cli import main
    from .config import TrainConfig
    from .loop import compare, train
