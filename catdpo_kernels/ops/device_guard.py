"""Launch Triton kernels on the device of their tensors.

Triton launches on the *current* CUDA device. Tensors on ``cuda:1`` while the
current device is 0 would be read from the wrong device (an illegal access), so
every launch runs under the guard of its tensors' device.
"""

from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors, a no-op context otherwise."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
