"""``catdpo-train``: the command line.

* ``catdpo-train [options]`` (``catdpo-train train [options]`` works too): Cat-DPO
  training of a causal LM (:mod:`catdpo_kernels.training.loop`); ``--compare``
  runs ``dpo``, ``safedpo`` and ``catdpo`` and prints one side-by-side table.
* ``catdpo-train data``: read a PKU-SafeRLHF-schema data set, apply the SafeDPO
  transform and print the category names and counts (and any malformed rows).

Every option is checked before any heavy work, and a user mistake (a missing
file, a bad number, a device that is not there, a malformed data row) prints one
``error: ...`` line with a hint and exits with status 2; ``--debug`` shows the
traceback instead. ``--help`` imports neither torch nor transformers.

Running the same command again continues the run from its last complete
checkpoint, or, once it has finished, says so and exits 0 (``--resume auto``,
the default); ``--overwrite`` starts again.

Multi-process: ``torchrun --nproc_per_node=2 -m catdpo_kernels.training ...``
(gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

from .config import PREFERENCE_KEYS, add_arguments, config_from_args
from .validate import UsageError, check_source, validate

PROG = "catdpo-train"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line with a hint, not argparse's usage block of every option.
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The training options, at the top level (``--help`` lists them)."""
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [options]\n       {PROG} data [--data SOURCE] [options]",
        description="Cat-DPO (category-adaptive safety DPO) training of a causal LM with catdpo_kernels. "
        "With no option: a tiny random Llama on the bundled PKU-SafeRLHF-schema sample, on the CPU. "
        "Running the same command again resumes the run, or reports that it has finished.",
        epilog=f"{PROG} data [--data SOURCE]: report a data set's SafeDPO transform and category counts "
        f"({PROG} data --help).",
    )
    add_arguments(parser)
    return parser


def build_data_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} data", description="Report a data set's SafeDPO transform and category counts.")
    p.add_argument("--data", default=None, help="a data file, a directory, or a hub name (default: the bundled sample)")
    p.add_argument("--split", default="train")
    p.add_argument("--data-config", default=None)
    p.add_argument("--on-bad-rows", choices=("raise", "skip"), default="raise")
    p.add_argument("--preference-key", choices=PREFERENCE_KEYS, default="better_response_id")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _guarded(debug: bool, fn) -> int:
    """``fn()``, with a user mistake as one ``error:`` line (status 2) unless ``--debug``."""
    try:
        return fn()
    except UsageError as e:
        if debug:
            raise
        return _error(str(e))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


def _data_report(ns) -> int:
    source = os.path.expanduser(ns.data) if ns.data is not None else None
    check_source("--data", source, (ns.split,))
    from .. import data as D

    try:
        _, report = D.load_pairs(
            source, split=ns.split, config=ns.data_config, on_error=ns.on_bad_rows, preference_key=ns.preference_key
        )
    except D.MalformedRowError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot read the data: {e}") from None
    print(report.format(f"{source or 'bundled sample'} [{ns.split}]"))
    for issue in report.skipped_malformed:
        print(f"  skipped: {issue}")
    return 0


def _check_extras() -> None:
    # find_spec, not import: importing transformers costs seconds, and the run imports it anyway.
    missing = [m for m in ("transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f'catdpo-train needs the [train] extra ({missing[0]} is missing): pip install "catdpo_kernels[train]"'
        )


def _train_main(ns) -> int:
    cfg = validate(config_from_args(ns), compare=ns.compare)
    _check_extras()
    if not ns.compare and _finished_already(cfg):
        return 0
    from ..cpu_threads import auto_threads, user_thread_setting

    if cfg.threads is None and user_thread_setting() is None:
        cfg = dataclasses.replace(cfg, threads=auto_threads())
    from .loop import compare, train

    (compare if ns.compare else train)(cfg)
    return 0


def _finished_already(cfg) -> bool:
    """Report a finished run without importing torch (a single process only: torchrun ranks go through train)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    from .report import report_finished
    from .rundir import plan_run

    plan = plan_run(cfg)
    if plan.finished is None:
        return False
    report_finished(cfg, plan, console=True)
    return True


def run(ns) -> dict:
    """Train (or, with ``--compare``, compare) with the parsed options (no thread choice, errors raised)."""
    from .loop import compare, train

    cfg = config_from_args(ns)
    return compare(cfg) if getattr(ns, "compare", False) else train(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        ns = build_data_parser().parse_args(argv[1:])
        return _guarded(ns.debug, lambda: _data_report(ns))
    if argv[:1] == ["train"]:  # the former subcommand
        argv = argv[1:]
    ns = build_parser().parse_args(argv)
    return _guarded(ns.debug, lambda: _train_main(ns))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
