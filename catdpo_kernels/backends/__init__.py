"""Backend registry: ``backend=`` names to implementations (see ``base.Backend``).

``auto`` picks Triton for CUDA tensors (when triton is installed) and the
chunked torch path everywhere else.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import Backend
from .reference import ReferenceBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

REGISTRY: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), TorchBackend(), TritonBackend())}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend ``name`` (``auto`` resolved for ``device``), or ``ValueError`` if it cannot run there."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    try:
        backend = REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {('auto', *REGISTRY)}, got {name!r}") from None
    backend.check_device(device)
    return backend


__all__ = ["REGISTRY", "Backend", "resolve_backend", "triton_available"]
