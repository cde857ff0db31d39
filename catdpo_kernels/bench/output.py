"""Where a run's report goes, the same in both modes.

The JSON and markdown files are rewritten after every row (so a killed run leaves
what it had measured), the plot is drawn once at the end, then the terminal table
is printed. ``report`` hands the table, markdown and plot of a ``--head`` run to
``head_report``; the mode only says how its rows are annotated before each write.
"""

from __future__ import annotations

import os

from . import report as R


def saved_paths(directory: str | None, meta: dict, tag: str | None = None) -> list[str]:
    """``--save-results DIR``: ``DIR/<device>[_<tag>]_<UTC time>`` ``.json``, ``.md`` and ``.png``, so that
    the runs of several machines and modes can sit side by side; none without the option."""
    if not directory:
        return []
    from .env import device_slug

    stamp = meta["date_utc"][:19].replace(":", "").replace("-", "")
    stem = os.path.join(directory, "_".join(filter(None, (device_slug(meta["device"]), tag, stamp))))
    return [stem + ".json", stem + ".md", stem + ".png"]


class Output:
    """The files of ``--json``, ``--markdown``, ``--plot`` and ``--save-results`` for one report.

    ``annotate()`` fills the figures derived from the rows (ratios, targets); it runs before every
    write because rows arrive one by one and each changes the ratios of its case.
    """

    def __init__(self, report: dict, args, *, annotate, tag: str | None = None):
        self.report, self.annotate = report, annotate
        self.json, self.markdown, self.plot = args.json, args.markdown, args.plot
        self.saved = saved_paths(args.save_results, report["meta"], tag)

    def flush(self, final: bool = False) -> None:
        self.annotate()
        if final:  # first, so that a note on a plot that could not be drawn reaches the files
            for path in [self.plot] + self.saved[2:]:
                note = R.write_plot(self.report, path) if path else None
                if note:
                    self.report["notes"].append(f"plot {path} not written: {note}")
                    break
        for path in [self.json] + self.saved[:1]:
            if path:
                R.write_json(self.report, path)
        for path in [self.markdown] + self.saved[1:2]:
            if path:
                R.write_markdown(self.report, path)

    def finish(self, status: int) -> int:
        """Prints the table and the files written; the exit status is 1 when a row failed (error, oom)
        and nothing else (an interruption) has set one."""
        print(R.format_table(self.report), flush=True)
        written = [p for p in (self.json, self.markdown, self.plot, *self.saved) if p]
        if written:
            print("\nwrote " + ", ".join(written), flush=True)
        if status == 0 and any(r["status"] in ("error", "oom") for r in self.report["results"]):
            status = 1
        return status
