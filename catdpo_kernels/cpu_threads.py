"""How many intra-op CPU threads a run uses (``catdpo-train`` and ``catdpo-bench``).

``train(cfg)`` changes torch's thread count only when ``cfg.threads`` is set (and
puts it back afterwards): a library call leaves a setting the caller made, with
``torch.set_num_threads`` or ``OMP_NUM_THREADS``, alone. The ``catdpo-train``
command picks ``cfg.threads`` with ``auto_threads()`` unless ``--threads`` or
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` say otherwise.

Why not torch's default (one thread per core): torch's OpenMP threads spin while
they wait for work, so every thread beyond the cores that are actually free
fights a busy process for a core. The default run (57 steps, training seconds),
measured on a 2-core machine:

======================  =========  =====================================
                        1 thread   2 threads (torch's default)
======================  =========  =====================================
idle                    3.9-4.1 s  2.6-2.8 s
one busy process        4.0-4.1 s  10 s, 26 s, over 120 s (stopped there)
======================  =========  =====================================

A thread too few costs 1.5x at most; a thread too many, 2.5x to over 30x. Hence
one thread per idle core, and "busy" read conservatively (``busy_cores``).
"""

from __future__ import annotations

import contextlib
import os
import time

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _proc_stat_busy() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs so far, from ``/proc/stat`` (``None`` off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_cores(window: float = 0.25) -> float:
    """Cores other processes keep busy: the larger of the 1-minute load average and a ``window``-second
    sample of ``/proc/stat`` (which sees a process that started a moment ago; this one sleeps meanwhile).

    The larger, because the two mistakes cost very differently: one thread too few costs the
    run about 1.5x at most, one too many (a thread spinning against a busy process) 6x to 40x.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = 0.0
    before = _proc_stat_busy()
    if before is None or window <= 0:
        return load
    time.sleep(window)
    after = _proc_stat_busy()
    now = (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)
    return max(load, now)


def user_thread_setting() -> str | None:
    """``OMP_NUM_THREADS=4`` when the user set a thread count in the environment, else ``None``."""
    for name in THREAD_ENV:
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name].strip()}"
    return None


def auto_threads(cores: int | None = None, load: float | None = None, local_world: int | None = None) -> int:
    """One thread per idle core, shared by the processes of this machine, at least one:
    ``max(1, (cores - round(load)) // local_world)`` (see the table in the module docstring).

    On an idle machine that is torch's own choice, so a larger model still gets every core
    for its matrix products; a core another process keeps busy gets no thread of ours.
    """
    cores = available_cores() if cores is None else cores
    load = busy_cores() if load is None else load
    if local_world is None:  # torchrun starts one process per device on this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    idle = min(cores, cores - int(round(load)))
    return max(1, idle // max(1, local_world))


@contextlib.contextmanager
def thread_count(threads: int | None):
    """Run the block with ``threads`` intra-op threads (``None``: as they are), then restore the count."""
    import torch

    if threads is None:
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
