"""The progress of a sweep on stderr: a tqdm bar on a terminal, and a line per finished row."""

from __future__ import annotations

import sys


class _PlainProgress:
    """Stands in for tqdm when it is not installed (a bare GPU machine): lines only."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def write(self, text, file=None):
        print(text, file=file or sys.stderr, flush=True)

    def close(self):
        pass


def progress_bar(total: int, *, disable: bool):
    """A tqdm bar on a terminal (none when stderr is not a TTY or with --no-progress)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress()
    return tqdm(total=total, desc="catdpo-bench", unit="row", file=sys.stderr, disable=True if disable else None)


def say(progress, text: str) -> None:
    """A line above the bar (tqdm's write keeps the bar intact)."""
    progress.write(text, file=sys.stderr)
