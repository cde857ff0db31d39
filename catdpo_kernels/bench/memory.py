"""Peak memory of a callable, above what was allocated when it started.

CUDA: the caching allocator's peak counter. CPU: torch keeps no peak counter,
so replay the allocation events that the profiler records (``[memory]``
events carry +bytes for an allocation and -bytes for a free).
"""

from __future__ import annotations

import logging
import os
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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
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


def peak_above_start(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_above_start(fn, device)
    return cpu_peak_above_start(fn)
