"""``catdpo-train``: the command line.

Subcommands:

* ``train`` (the default when the first argument is not a subcommand): Cat-DPO
  training of a causal LM, see :mod:`catdpo_kernels.train`; ``--compare`` runs
  ``dpo``, ``safedpo`` and ``catdpo`` and prints one side-by-side table.
* ``data``: read a PKU-SafeRLHF-schema data set, apply the SafeDPO transform and
  print the category names and counts (and any malformed rows).

Multi-process: ``torchrun --nproc_per_node=2 -m catdpo_kernels.cli train ...``
(gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("train", "data")


def build_parser() -> argparse.ArgumentParser:
    from . import data as D
    from .train import add_arguments

    parser = argparse.ArgumentParser(
        prog="catdpo-train",
        description="Cat-DPO (category-adaptive safety DPO) training with catdpo_kernels. "
        "With no subcommand, 'train' is assumed.",
    )
    sub = parser.add_subparsers(dest="command")
    add_arguments(sub.add_parser("train", help="train a causal LM (default)", description="Train a causal LM with "
                                 "Cat-DPO, DPO, IPO or SafeDPO on PKU-SafeRLHF-schema data."))  # fmt: skip
    p = sub.add_parser("data", help="report a data set's SafeDPO transform and category counts")
    p.add_argument("--data", default=None, help="a data file, a directory, or a hub name (default: the bundled sample)")
    p.add_argument("--split", default="train")
    p.add_argument("--data-config", default=None)
    p.add_argument("--on-bad-rows", choices=("raise", "skip"), default="raise")
    p.add_argument("--preference-key", choices=D.PREFERENCE_KEYS, default="better_response_id")
    return parser


def _data_report(ns) -> int:
    from . import data as D

    try:
        _, report = D.load_pairs(ns.data, split=ns.split, config=ns.data_config, on_error=ns.on_bad_rows,
                                 preference_key=ns.preference_key)  # fmt: skip
    except D.MalformedRowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format(f"{ns.data or 'bundled sample'} [{ns.split}]"))
    for issue in report.skipped_malformed:
        print(f"  skipped: {issue}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    ns = build_parser().parse_args(argv)
    if ns.command == "data":
        return _data_report(ns)
    from . import data as D

    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: catdpo-train needs the [train] extra ({e.name} is missing): "
              "pip install \"catdpo_kernels[train]\"", file=sys.stderr)  # fmt: skip
        return 2
    from .train import run

    try:
        run(ns)
    except D.MalformedRowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
