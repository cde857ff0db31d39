"""Peak memory of a callable, above what was allocated when it started.

CUDA: the caching allocator's peak counter. CPU: torch keeps no peak counter,
so replay the allocation events that the profiler records (``[memory]``
events carry +bytes for an allocation and -bytes for a free).

Both count only what ``fn`` allocates while it runs (its inputs are already
there). A returned tensor is still alive at the end, so it counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable

import torch


def cuda_peak_above_start(fn: Callable[[], object], device=None) -> tuple[int, object]:
    """Returns ``(peak bytes above the allocation at entry, fn's result)``."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start, result


def cpu_peak_above_start(fn: Callable[[], object]) -> tuple[int, object]:
    """Returns ``(peak bytes above the allocation at entry, fn's result)`` for CPU tensors."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto prints a line per start/stop on stderr; keep benchmarks quiet.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, result


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while the profiler starts or stops.

    Kineto writes a ``profiler_start`` / ``profiler_stop`` line to stderr from C++
    on every start and stop, whatever ``KINETO_LOG_LEVEL`` says; only those two
    calls are wrapped, never ``fn`` itself.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def tensor_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peak_above_start(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_above_start(fn, device)
    return cpu_peak_above_start(fn)
