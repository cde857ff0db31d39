"""The CPU side of a ``catdpo-bench`` run: how many threads it times with, and the contention mode.

Many users share their machine. torch's OpenMP threads spin at the end of every parallel
region until the slowest thread arrives, so a thread whose core another process holds stalls
the whole op: on 2 cores with one busy process, 2 threads can be several times slower than 1.
Hence:

* ``--threads auto`` (the default) times with one thread per idle core
  (``cpu_threads.auto_threads``), unless ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` or
  ``--threads N`` say otherwise; the report records the count and what chose it;
* ``--contention N`` starts ``N`` busy processes (a pure-Python spin each, one core apiece) for
  the whole sweep, the way another job on the machine would, so that the comparison is measured
  under load on purpose rather than by accident. ``auto`` counts them as busy cores.
"""

from __future__ import annotations

import atexit
import subprocess
import sys

from ..cpu_threads import auto_threads, available_cores, busy_cores, user_thread_setting

SPIN = "while True:\n    pass\n"


class BusyProcesses:
    """``n`` processes that each keep one core busy until ``stop()`` (also at interpreter exit)."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SPIN],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        atexit.register(self.stop)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []

    @property
    def running(self) -> int:
        return sum(proc.poll() is None for proc in self.procs)


def parse_threads(text: str) -> int | None:
    """``--threads``: ``auto`` (``None``) or a positive count."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--threads must be 'auto' or a positive integer, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--threads must be 'auto' or a positive integer, got {n}")
    return n


def choose_threads(requested: int | None, contention: int) -> tuple[int | None, str]:
    """``(count to set, or None to leave torch's, why)``."""
    if requested is not None:
        return requested, f"--threads {requested}"
    setting = user_thread_setting()
    if setting is not None:
        return None, f"{setting} (environment)"
    cores, load = available_cores(), busy_cores()
    n = auto_threads(cores, load + contention)
    extra = f" + {contention} busy process{'es' if contention > 1 else ''}" if contention else ""
    return n, f"auto: {cores} cores, load {load:.2f}{extra}"


class CpuRun:
    """What ``setup_cpu`` changed, undone by ``close()`` when the sweep ends (busy processes stopped,
    torch's thread count put back: ``main()`` may run inside a longer-lived process)."""

    def __init__(self, threads_before: int, busy: BusyProcesses | None):
        self.threads_before, self.busy = threads_before, busy

    def close(self) -> None:
        import torch

        if self.busy is not None:
            self.busy.stop()
        torch.set_num_threads(self.threads_before)


def setup_cpu(args, device) -> tuple[dict, CpuRun | None]:
    """Set the thread count for a CPU run (before ``start_meta`` reads it) and start the busy processes.

    Returns the record for ``meta["host"]`` and the ``CpuRun`` to close when the sweep ends.
    """
    import torch

    if device.type != "cpu":
        if args.contention:
            raise ValueError("--contention is a CPU mode (busy processes compete for CPU cores, not for a GPU)")
        return {}, None
    before = torch.get_num_threads()
    threads, why = choose_threads(args.threads, args.contention)
    if threads is not None:
        torch.set_num_threads(threads)
    busy = None
    if args.contention:
        busy = BusyProcesses(args.contention)
        busy.start()
    record = {
        "threads": {"count": torch.get_num_threads(), "chosen_by": why},
        "contention": {"busy_processes": args.contention, "cores": available_cores()},
    }
    return record, CpuRun(before, busy)


def contention_note(record: dict) -> str | None:
    if not record or not record["contention"]["busy_processes"]:
        return None
    n = record["contention"]["busy_processes"]
    threads = record["threads"]["count"]
    return (
        f"contention mode: {n} busy process{'es' if n > 1 else ''} (one core each) ran during the whole "
        f"sweep, on {record['contention']['cores']} cores; {threads} torch thread{'s' if threads != 1 else ''} "
        f"({record['threads']['chosen_by']})"
    )
