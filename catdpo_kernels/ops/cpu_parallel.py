"""Independent CPU blocks spread over worker threads, each running its ops on one thread.

Why not torch's own intra-op parallelism inside every op of every block: each op is an
OpenMP parallel region, and a region ends only when its slowest thread arrives. On a
machine where another process holds a core, the thread that shares that core arrives a
scheduler time slice late at *every* region; a loop of a few hundred small regions then
runs much slower than one big op (measured on 2 cores, 8x512x32000 fp32, with one other
busy process: the plain loop took 1.18x the naive loss's time, these workers 0.68x).

Here ``N`` workers (``N`` = torch's intra-op thread count) take whole blocks from a queue
and run them on one thread each: there is no barrier between blocks, and a worker that
loses its core delays only the block it holds while the others take the rest. Every
block is computed by the same single-threaded kernels whichever worker runs it, and
ATen's reductions along the vocabulary never split a row across threads, so the results
are bitwise those of the plain loop.

Only used for CPU tensors, with more than one thread and more than one block
(``block_workers`` says where the plain loop runs instead).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# CATDPO_CPU_BLOCK_WORKERS=N caps the workers; 1 runs every block in the calling thread.
WORKERS_ENV = "CATDPO_CPU_BLOCK_WORKERS"
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
# A forked child inherits the pools but not their threads: it builds its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOLS.clear)


def _omp_set_num_threads():
    """The OpenMP runtime's ``omp_set_num_threads`` (thread-local), or ``None`` where it is not visible."""
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):  # pragma: no cover - no OpenMP symbol in the process (macOS, Windows)
        return None


_SET_THREADS = _omp_set_num_threads()


def _one_thread_worker() -> None:
    # torch applies its global thread count to a thread lazily, on its first parallel op;
    # do that now, then lower this thread's own OpenMP count (torch's global setting,
    # which the calling thread uses, stays as it is).
    torch.get_num_threads()
    _SET_THREADS(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="catdpo-cpu", initializer=_one_thread_worker)
            _POOLS[workers] = pool
        return pool


def block_workers(device: torch.device) -> int:
    """Workers for a loop of CPU blocks: torch's intra-op thread count, or 1 for the plain loop.

    The plain loop runs for non-CPU tensors, while ``torch.compile`` traces, where the OpenMP
    runtime is out of reach, and under ``torch.profiler`` (which sees only the calling
    thread's ops and allocations: the profile then shows every one of them). Callers size
    each block to ``1 / workers`` of their budget, so that the blocks in flight together hold
    no more than the plain loop's one block.
    """
    if (
        device.type != "cpu"
        or _SET_THREADS is None
        or torch.compiler.is_compiling()
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return 1
    limit = os.environ.get(WORKERS_ENV, "").strip()
    workers = torch.get_num_threads()
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"{WORKERS_ENV} must be a positive integer (1: the plain loop), got {limit!r}")
        workers = min(workers, int(limit))
    return max(1, workers)


def for_each_block(fn: Callable[..., None], blocks: Sequence[tuple], workers: int) -> None:
    """``fn(*block)`` for every block, on ``workers`` threads; the calls must be independent (disjoint outputs)."""
    workers = min(workers, len(blocks))
    if workers <= 1:
        for block in blocks:
            fn(*block)
        return

    def run(block):
        with torch.no_grad():  # grad mode is per thread: the workers start with it on
            fn(*block)

    # list() waits for every block and re-raises the first error.
    list(_pool(workers).map(run, blocks))
