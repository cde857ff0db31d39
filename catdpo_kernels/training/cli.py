"""``catdpo-train``: the command line.

Subcommands:

* ``train`` (the default when the first argument is not a subcommand): Cat-DPO
  training of a causal LM (:mod:`catdpo_kernels.training.loop`); ``--compare``
  runs ``dpo``, ``safedpo`` and ``catdpo`` and prints one side-by-side table.
* ``data``: read a PKU-SafeRLHF-schema data set, apply the SafeDPO transform and
  print the category names and counts (and any malformed rows).

A user mistake (a malformed data row, a missing extra) prints one ``error: ...``
line and exits with status 2.

Multi-process: ``torchrun --nproc_per_node=2 -m catdpo_kernels.training train ...``
(gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import sys

from .. import data as D
from .config import add_arguments, config_from_args

SUBCOMMANDS = ("train", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catdpo-train",
        description="Cat-DPO (category-adaptive safety DPO) training with catdpo_kernels. "
        "With no subcommand, 'train' is assumed.",
    )
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser(
        "train",
        help="train a causal LM (default)",
        description="Train a causal LM with Cat-DPO, DPO, IPO or SafeDPO on PKU-SafeRLHF-schema data.",
    )
    add_arguments(train)
    p = sub.add_parser("data", help="report a data set's SafeDPO transform and category counts")
    p.add_argument("--data", default=None, help="a data file, a directory, or a hub name (default: the bundled sample)")
    p.add_argument("--split", default="train")
    p.add_argument("--data-config", default=None)
    p.add_argument("--on-bad-rows", choices=("raise", "skip"), default="raise")
    p.add_argument("--preference-key", choices=D.PREFERENCE_KEYS, default="better_response_id")
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _data_report(ns) -> int:
    try:
        _, report = D.load_pairs(
            ns.data, split=ns.split, config=ns.data_config, on_error=ns.on_bad_rows, preference_key=ns.preference_key
        )
    except D.MalformedRowError as e:
        return _error(str(e))
    print(report.format(f"{ns.data or 'bundled sample'} [{ns.split}]"))
    for issue in report.skipped_malformed:
        print(f"  skipped: {issue}")
    return 0


def run(ns) -> dict:
    """Train (or, with ``--compare``, compare) with the parsed ``train`` options."""
    from .loop import compare, train

    cfg = config_from_args(ns)
    if getattr(ns, "compare", False):
        return compare(cfg)
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    ns = build_parser().parse_args(argv)
    if ns.command == "data":
        return _data_report(ns)
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        extra = 'pip install "catdpo_kernels[train]"'
        return _error(f"catdpo-train needs the [train] extra ({e.name} is missing): {extra}")
    try:
        run(ns)
    except D.MalformedRowError as e:
        return _error(str(e))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
