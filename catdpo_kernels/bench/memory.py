"""Peak memory of a callable, above what was allocated when it started.

CUDA: the caching allocator's peak counter. CPU: torch keeps no peak counter,
so replay the allocation events that the profiler records (``[memory]``
events carry +bytes for an allocation and -bytes for a free).

Both count only what ``fn`` allocates while it runs (its inputs are already
there). A returned tensor is still alive at the end, so it counts.

Also what both bench modes share around those figures: the memory fields of a
row (``record_rises``), the errors that mean out of memory, and the clean-up
between rows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable

import torch

# What running out of memory raises: the CUDA caching allocator's error, or the host's.
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


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
    with _cpu_profile() as prof:
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


@contextlib.contextmanager
def _cpu_profile():
    """A CPU profiler that records allocations while the block runs, started and stopped quietly."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto prints a line per start/stop on stderr; keep benchmarks quiet.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)


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


def cpu_peak_excluding_returned(fn: Callable[[], object], returned: Callable[[object], list]):
    """``(peak, peak without the returned buffers, fn's result)``, CPU tensors, bytes above the entry.

    ``returned(result)`` names tensors that ``fn`` allocated and returns (gradients, say).
    The second figure replays the profiler's allocation events without those
    buffers, from their allocation on: the peak of everything else, whenever it
    happened. (``peak - returned bytes`` understates it when the peak comes
    before the returned buffers exist.)
    """
    from torch._C._profiler import _EventType

    with _cpu_profile() as prof:
        result = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if str(f.device).startswith("cpu"):
                events.append((node.start_time_ns, f.ptr, f.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    ptrs = {t.untyped_storage().data_ptr() for t in returned(result) if t is not None}
    last_alloc: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        if ptr in ptrs:
            if size > 0:
                last_alloc[ptr] = i
            else:
                last_alloc.pop(ptr, None)  # freed again: not the returned buffer
    skip = set(last_alloc.values())
    current = current_kept = peak = peak_kept = 0
    for i, (_, _, size) in enumerate(events):
        current += size
        peak = max(peak, current)
        if i not in skip:
            current_kept += size
            peak_kept = max(peak_kept, current_kept)
    return peak, peak_kept, result


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


def record_rises(mem: dict, forward, step, device, *, replay_returned: bool = False) -> None:
    """Adds to a row's memory fields (``input_bytes``, ``grad_bytes`` already there) the peak rise of one
    ``forward()`` and of one ``step()`` (forward + backward).

    ``fwd_bwd_rise_excl_grad_bytes`` leaves out the returned gradients, which every method has to
    produce: the rise minus their bytes or, with ``replay_returned`` on CPU, the allocation events
    replayed without those buffers (``step()`` then returns the gradients); ``replay_returned`` also
    records the plain difference and which of the two was used.
    """
    grad_bytes = mem["grad_bytes"]
    cuda = torch.device(device).type == "cuda"
    fwd_rise, out = peak_above_start(forward, device)
    del out
    if replay_returned and not cuda:
        rise, excl, out = cpu_peak_excluding_returned(step, list)
    else:
        rise, out = peak_above_start(step, device)
        excl = max(rise - grad_bytes, 0)
    del out
    mem.update(fwd_rise_bytes=fwd_rise, fwd_bwd_rise_bytes=rise, fwd_bwd_rise_excl_grad_bytes=excl)
    if replay_returned:
        mem["fwd_bwd_rise_minus_grad_bytes"] = max(rise - grad_bytes, 0)
    mem["peak_bytes"] = mem["input_bytes"] + rise
    if cuda:
        mem["method"] = "CUDA caching-allocator peak counter"
    else:
        events = "[memory] / allocation events" if replay_returned else "[memory] events"
        mem["method"] = f"torch.profiler {events} replayed"
    if replay_returned:
        mem["excl_grad_method"] = (
            "peak rise minus the returned gradients' bytes"
            if cuda
            else "allocation events replayed without the returned gradient buffers"
        )


def release(device) -> None:
    """Free what the last row left behind (cycles, the CUDA cache), so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
