"""Loads the compiled ``csrc`` extension that registers ``torch.ops.catdpo.segment_reduce``.

Load order, tried once per process and cached:

1. ``catdpo_kernels._C``, built ahead of time by ``setup.py``
   (``pip install --no-build-isolation -e .``);
2. a JIT build of the same sources with ``torch.utils.cpp_extension.load`` (ninja,
   cached in torch's extensions directory; CUDA sources only when a GPU and a
   CUDA toolkit are usable right now);
3. nothing: callers use the pure-torch implementation, after one ``RuntimeWarning``.

Environment switches:

- ``CATDPO_DISABLE_EXT=1``: skip the extension entirely (no warning).
- ``CATDPO_FORCE_JIT=1``: skip the ahead-of-time module and JIT-build.
- ``CATDPO_NO_JIT=1``: never JIT-build (use the AOT module or the fallback).
- ``CATDPO_JIT_VERBOSE=1``: show the compiler output of the JIT build.

This file imports only the standard library at module level: ``setup.py`` loads
it by path, before the package is installed, to share the build settings.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from pathlib import Path
from types import ModuleType

OP_NAME = "catdpo::segment_reduce"
ENV_DISABLE = "CATDPO_DISABLE_EXT"
ENV_FORCE_JIT = "CATDPO_FORCE_JIT"
ENV_NO_JIT = "CATDPO_NO_JIT"
ENV_JIT_VERBOSE = "CATDPO_JIT_VERBOSE"

CPU_SOURCES = ("segment_reduce.cpp", "module.cpp")
CUDA_SOURCES = ("segment_reduce_cuda.cu",)
# Ampere and Hopper (+PTX, which newer GPUs JIT-compile); used only when no GPU is visible at build time.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
CUDA_DEFINE = "-DCATDPO_WITH_CUDA"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_source = "none"  # "aot" | "jit" | "fallback" | "disabled" once loaded
_errors: list[str] = []
_kernel_cache: dict[str, bool] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------- build settings
def source_dir() -> Path | None:
    """The C++/CUDA sources: packaged copy (``_csrc``, wheels) or the repository's ``csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in CPU_SOURCES + CUDA_SOURCES):
            return cand
    return None


def configure_cuda_env(gpu_visible: bool) -> None:
    """Build defaults (docs/design.md, "Testing"); must run before ``torch.utils.cpp_extension`` is imported.

    Without ``CUDA_HOME`` torch derives it from ``which nvcc``; with nvcc linked into
    ``/usr/local/bin`` that yields ``/usr/local`` and the link fails on ``-lcudart``.
    """
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if Path("/usr/local/cuda/bin/nvcc").is_file():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


def cuda_include_dirs() -> list[str]:
    """Header dirs of pip's ``nvidia`` packages that hold ``cusparse.h`` (not in the toolkit here)."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(Path(base).glob("*/include")):
            if (inc / "cusparse.h").is_file():
                dirs.append(str(inc))
    return dirs


def cuda_toolkit_home(cpp_extension) -> str | None:
    """The toolkit torch will compile with, or None when there is no usable nvcc."""
    import torch

    if torch.version.cuda is None:
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    if not home or not Path(home, "bin", "nvcc").is_file():
        return None
    # cpp_extension resolves CUDA_HOME at import; keep it in line with configure_cuda_env.
    cpp_extension.CUDA_HOME = home
    return home


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    defines = [CUDA_DEFINE] if with_cuda else []
    return {"cxx": ["-O3", *defines], "nvcc": ["-O3", *defines]}


# ------------------------------------------------------------------ loading
def _import_aot() -> ModuleType:
    import torch  # noqa: F401  (libtorch must be loaded before the extension's .so)

    from . import _C  # type: ignore[attr-defined]

    return _C


def _jit_name(with_cuda: bool) -> str:
    import torch

    # The torch version is part of the name: torch's JIT cache keys on sources and
    # flags only, so an upgrade would otherwise reuse a binary built for another ABI.
    tag = re.sub(r"\W", "_", torch.__version__)
    return f"catdpo_kernels_{'cuda' if with_cuda else 'cpu'}_torch{tag}"


def _jit_build() -> ModuleType:
    import torch

    src = source_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not present next to the package")
    gpu = torch.cuda.is_available()
    configure_cuda_env(gpu_visible=gpu)
    from torch.utils import cpp_extension

    with_cuda = gpu and cuda_toolkit_home(cpp_extension) is not None
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    flags = compile_args(with_cuda)
    _log.info(
        "catdpo_kernels: JIT-building the extension (%s); the first build takes about a minute",
        "CPU+CUDA" if with_cuda else "CPU",
    )
    return cpp_extension.load(
        name=_jit_name(with_cuda),
        sources=sources,
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=[str(src)] + (cuda_include_dirs() if with_cuda else []),
        with_cuda=with_cuda,
        verbose=_flag(ENV_JIT_VERBOSE),
    )


def _op_registered() -> bool:
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")


def _load() -> tuple[ModuleType | None, str]:
    if _flag(ENV_DISABLE):
        return None, "disabled"
    attempts = []
    if not _flag(ENV_FORCE_JIT):
        attempts.append(("aot", _import_aot))
    if not _flag(ENV_NO_JIT):
        attempts.append(("jit", _jit_build))
    for kind, attempt in attempts:
        try:
            module = attempt()
            if not _op_registered():
                raise RuntimeError(f"{kind} module loaded but {OP_NAME} has no CPU kernel")
            return module, kind
        except Exception as exc:  # any failure means: try the next way, then fall back
            lines = str(exc).strip().splitlines()
            _errors.append(f"{kind}: {type(exc).__name__}: {lines[-1] if lines else ''}")
    reasons = "; ".join(_errors) or "ahead-of-time module skipped and JIT disabled"
    warnings.warn(
        "catdpo_kernels: the compiled segment_reduce extension is unavailable "
        f"({reasons}). Using the pure-torch fallback (same results, slower). Build it with "
        "`pip install --no-build-isolation -e .`, or set CATDPO_DISABLE_EXT=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, "fallback"


def load_extension() -> ModuleType | None:
    """The compiled module (AOT or JIT), or None when the pure-torch fallback is in use. Cached."""
    global _loaded, _module, _source
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            module, source = _load()
            _module, _source, _loaded = module, source, True
            # Filled now so that compiled_kernel_loaded() is a plain dict read under torch.compile.
            for device_type in ("cpu", "cuda", "meta"):
                compiled_kernel_loaded(device_type)
    return _module


def has_compiled_op(device_type: str = "cpu") -> bool:
    """True when ``torch.ops.catdpo.segment_reduce`` has a kernel for ``device_type`` (loads on first use)."""
    if load_extension() is None:
        return False
    return compiled_kernel_loaded(device_type)


def compiled_kernel_loaded(device_type: str = "cpu") -> bool:
    """Like ``has_compiled_op`` but never loads or builds; safe to trace under ``torch.compile``."""
    cached = _kernel_cache.get(device_type)
    if cached is not None:
        return cached
    if not _loaded or _module is None:
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    has = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)
    _kernel_cache[device_type] = has
    return has


def extension_source() -> str:
    """How the op is provided: ``aot``, ``jit``, ``fallback`` or ``disabled`` (loads on first use)."""
    load_extension()
    return _source


def build_info() -> dict:
    """Where the op comes from, which kernels it has, and why loading failed (if it did)."""
    module = load_extension()
    info = dict(source=_source, errors=list(_errors), cpu_kernel=False, cuda_kernel=False)
    if module is not None:
        info.update(module.build_info())
        info["cpu_kernel"] = compiled_kernel_loaded("cpu")
        info["cuda_kernel"] = compiled_kernel_loaded("cuda")
        info["module_file"] = getattr(module, "__file__", None)
    return info
