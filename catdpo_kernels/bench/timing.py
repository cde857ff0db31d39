"""How long a callable takes.

- GPU: ``triton.testing.do_bench`` (it flushes L2 before every run), median and
  20th/80th percentiles in ms. On top of that the callers rotate through several
  input buffers when one set of inputs is small enough to sit in L2.
- CPU: wall clock (``time.perf_counter``) over ``repeats`` runs, after the
  caller's warm-up; median, 20th/80th percentiles and minimum.

Also the device-to-device copy bandwidth that the achieved bandwidth is
compared against: a large ``dst.copy_(src)``, counting read + write bytes.
"""

from __future__ import annotations

import functools
import inspect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float | None
    runs: int | None  # None: do_bench chose the count from rep_ms
    method: str
    derived: bool = False  # True: computed from other modes (e.g. fwd_bwd - fwd), not measured

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], repeats: int) -> Timing:
    """Wall clock of ``repeats`` calls (the caller has warmed up)."""
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples, "wall clock (perf_counter)")


def summarize(samples_ms: list[float], method: str) -> Timing:
    """Median, 20th/80th percentiles and minimum of timed samples (ms)."""
    samples = sorted(samples_ms)
    return Timing(
        median_ms=statistics.median(samples),
        p20_ms=_quantile(samples, 0.2),
        p80_ms=_quantile(samples, 0.8),
        min_ms=samples[0],
        runs=len(samples),
        method=method,
    )


def time_gpu(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 200) -> Timing:
    """``triton.testing.do_bench`` median and quantiles (works on triton 3.0 to 3.8)."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    kwargs = {"warmup": warmup_ms, "rep": rep_ms}
    if "quantiles" in params:
        kwargs["quantiles"] = [0.5, 0.2, 0.8]
    result = do_bench(fn, **kwargs)
    if isinstance(result, (list, tuple)):
        median, p20, p80 = (float(v) for v in result[:3])
    else:  # a scalar (a do_bench without quantiles): the mean
        median = p20 = p80 = float(result)
    return Timing(median, p20, p80, None, None, method=f"triton.testing.do_bench(warmup={warmup_ms}ms, rep={rep_ms}ms)")


def derived_timing(total: Timing, part: Timing) -> Timing:
    """``total - part`` medians, for a mode that cannot be timed on its own."""
    value = max(total.median_ms - part.median_ms, 0.0)
    return Timing(value, value, value, None, None, method=f"{total.method}; fwd_bwd - fwd medians", derived=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_sets(set_bytes: int, device: torch.device, *, max_sets: int = 8) -> int:
    """How many input sets to rotate through so that one pass touches >= 4x the L2 size.

    1 on CPU, and 1 whenever one set already exceeds that (all realistic shapes);
    bounded so the extra sets take at most 20% of the free device memory.
    """
    if device.type != "cuda" or set_bytes <= 0:
        return 1
    want = math.ceil(4 * l2_cache_bytes(device) / set_bytes)
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(0.2 * free // set_bytes))
    return max(1, min(want, max_sets, fits))


def copy_bandwidth(device: torch.device, nbytes: int | None = None, *, repeats: int = 5) -> dict:
    """Device-to-device (or host memcpy) bandwidth of a large ``copy_``: (read + write) bytes / time."""
    device = torch.device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(2 * 2**30, free // 8))
        else:
            nbytes = 256 * 2**20
    numel = nbytes // 4
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    fn = functools.partial(dst.copy_, src)
    fn()
    synchronize(device)
    timing = time_gpu(fn, rep_ms=300) if device.type == "cuda" else time_cpu(fn, repeats)
    moved = 2 * numel * 4
    gbps = moved / (timing.median_ms * 1e-3) / 1e9
    del fn, src, dst  # free the buffers before returning
    return {
        "GBps": gbps,
        "bytes_per_copy": moved,
        "tensor_bytes": numel * 4,
        "median_ms": timing.median_ms,
        "method": (
            f"dst.copy_(src) of {numel * 4 / 2**30:.2f} GiB fp32, (read + write) bytes / median time; {timing.method}"
        ),
    }
