"""Where a result was measured: device, library versions, git commit, date.

Everything here is best effort: a missing piece is recorded as ``None`` or
``"unknown"``, never an exception (the machine may have no git, no GPU, ...).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# Environment variables that change what is measured; recorded when set.
ENV_KEYS = (
    "CATDPO_TRITON_CONFIG",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
    "TORCHINDUCTOR_COMPILE_THREADS",
    "OMP_NUM_THREADS",
    "CATDPO_NO_JIT",
    "CATDPO_DISABLE_EXT",
    "CATDPO_CPU_BLOCK_WORKERS",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "L2_cache_MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "cuda_runtime": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": cpu_model(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
    }


def device_label(info: dict) -> str:
    if info.get("type") == "cuda":
        return f"{info['name']} (CUDA {info.get('cuda_runtime')}, {info.get('memory_GiB')} GiB)"
    threads = info.get("torch_threads")
    plural = "" if threads == 1 else "s"
    return f"CPU: {info['name']} ({info.get('usable_cpus')} usable cores, {threads} torch thread{plural})"


def device_slug(info: dict) -> str:
    """A file-name-safe device name: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2cores``."""
    if info.get("type") == "cuda":
        text = info["name"]
    else:
        text = f"cpu {info['name']} {info.get('usable_cpus')}cores"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git_commit() -> dict:
    """HEAD and whether tracked files differ from it; ``CATDPO_GIT_COMMIT`` if git is unavailable."""
    out = {"commit": os.environ.get("CATDPO_GIT_COMMIT") or "unknown", "dirty": None}
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            diff = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=20
            )
            out["dirty"] = diff.returncode != 0
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def versions() -> dict:
    import catdpo_kernels

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "catdpo_kernels": getattr(catdpo_kernels, "__version__", None),
        "numpy": _version("numpy"),
        # Optional anchors: only their versions (nothing is imported here).
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "trl": _version("trl"),
    }
    return out


def extension_info() -> dict:
    """How ``torch.ops.catdpo.segment_reduce`` was provided in this run, if it was loaded."""
    try:
        from .. import _ext
    except Exception as exc:  # noqa: BLE001
        return {"source": "unavailable", "error": repr(exc)}
    if not getattr(_ext, "_loaded", False):
        return {"source": "not loaded"}
    try:
        info = _ext.build_info()
    except Exception as exc:  # noqa: BLE001
        return {"source": "unknown", "error": repr(exc)}
    return {k: info.get(k) for k in ("source", "cpu_kernel", "cuda_kernel", "errors")}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def collect(device: torch.device) -> dict:
    info = device_info(device)
    return {
        "date_utc": now_utc(),
        "device": info,
        "device_label": device_label(info),
        "host": {"platform": platform.platform(), "usable_cpus": usable_cpus()},
        "versions": versions(),
        "git": git_commit(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
