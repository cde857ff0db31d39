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


# Looked up once: a lookup per call would be a graph break under torch.compile
# (dynamo refuses to trace importlib on torch 2.11).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


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
