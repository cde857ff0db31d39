"""``torch.distributed`` for the training loop: set-up from torchrun's environment, rank, device.

One process per device; gloo on CPU, nccl on CUDA. Everything here is a no-op
(rank 0 of 1) in a single process.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..stats import all_reduce_sum

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "get_dist",
    "maybe_init_distributed",
    "pick_device",
    "rank_world",
    "process_group",
]


def get_dist():
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def maybe_init_distributed(device_pref: str = "auto") -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment; ``True`` if done here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


@contextlib.contextmanager
def process_group(device_pref: str = "auto"):
    """Initialise the process group (under torchrun) for the duration of the block, and destroy it after."""
    init_here = maybe_init_distributed(device_pref)
    try:
        yield
    finally:
        if init_here:
            get_dist().destroy_process_group()


def rank_world() -> tuple[int, int]:
    dist = get_dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def pick_device(pref: str) -> torch.device:
    """``auto``: CUDA when available; under torchrun, this rank's ``LOCAL_RANK`` device."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) if get_dist() else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(pref)


def barrier() -> None:
    dist = get_dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    dist = get_dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
