"""The frame of a ``catdpo-bench`` run, the same in both modes: the device, the machine's load, and
the sweep as a ``with`` block that an interruption stops without losing what was measured."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from .progress import progress_bar, say


class Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``): like Ctrl-C, stops the sweep but not the output."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Interrupted(f"signal {signum}")


def pick_device(choice: str, parser):
    """``--device`` (``auto``: CUDA when available) as a ``torch.device``."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type != "cuda" and "torch._inductor.config" not in sys.modules:
        # torch.compile's worker pool would start (and import torch in) background processes
        # that compete for the CPU with the timings that follow: compile in this process.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return device


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def start_meta(device) -> dict:
    """The report's ``meta`` (``env.collect``) with the load average at the start of the run."""
    from .env import collect

    meta = collect(device)
    meta["host"]["loadavg_start"] = loadavg()
    return meta


@dataclass
class RunPlan:
    """What one run measures, resolved from the options and the device's defaults; each mode adds its own."""

    device: Any
    shapes: list
    dtypes: list
    modes: list[str]
    variants: list
    repeats: int
    settings: Any

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def start_run(args, parser, device):
    """Thread count and busy processes of a CPU run (``cpu_setup``), then the report's ``meta``.

    Returns ``(meta, cpu_record, cpu_run)``; ``cpu_run`` (or ``None``) goes to ``Sweep`` to be closed.
    """
    from .cpu_setup import setup_cpu

    try:
        cpu_record, cpu_run = setup_cpu(args, device)
    except ValueError as exc:
        parser.error(str(exc))
    meta = start_meta(device)  # after the thread count is set: meta records it
    meta["host"].update(cpu_record)
    return meta, cpu_record, cpu_run


def cpu_notes(meta: dict, cpu_record: dict) -> list[str]:
    """The notes every CPU report opens with: the machine's load, and the contention mode if on."""
    from .cpu_setup import contention_note

    if meta["device"].get("type") == "cuda":
        return []
    contention = contention_note(cpu_record)
    return [load_note(meta)] + ([contention] if contention else [])


def load_note(meta: dict) -> str:
    """The note of a CPU run: its timings share the machine with whatever else runs on it."""
    return "CPU timings depend on machine load; load average at start " + ", ".join(
        f"{x:.2f}" for x in meta["host"]["loadavg_start"] or []
    )


class Sweep:
    """``with Sweep(report, output, total=...) as sweep:`` around the loop over the cases.

    ``sweep.progress`` is the bar (``total`` rows), ``sweep.say`` prints a line above it. SIGTERM
    stops the loop as Ctrl-C does, and either stop keeps what was measured: a note says so and
    ``sweep.status`` is 130. However the loop ends, the report gets its closing fields (load at the
    end, the extension's state), ``closing()`` adds the mode's last figures and notes, and
    ``output`` writes it a last time; any other exception then goes on.
    """

    def __init__(self, report: dict, output, *, total: int, no_progress: bool, closing=None, cpu_run=None):
        self.report, self.output, self.closing, self.cpu_run = report, output, closing, cpu_run
        self.total, self.no_progress = total, no_progress
        self.status = 0

    def __enter__(self) -> Sweep:
        self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
        self.progress = progress_bar(self.total, disable=self.no_progress)
        return self

    def say(self, text: str) -> None:
        say(self.progress, text)

    def __exit__(self, exc_type, exc, tb) -> bool:
        from .env import extension_info

        stopped = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, Interrupted))
        if stopped:
            self.report["notes"].append(f"interrupted ({exc or 'KeyboardInterrupt'}): partial results")
            self.status = 130
        self.progress.close()
        signal.signal(signal.SIGTERM, self._previous)
        if self.cpu_run is not None:  # busy processes stopped, thread count restored
            self.cpu_run.close()
        meta = self.report["meta"]
        meta["host"]["loadavg_end"] = loadavg()
        meta["extension"] = extension_info()
        if self.closing is not None:
            self.closing()
        self.output.flush(final=True)
        return stopped
