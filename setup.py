"""Builds the optional compiled extension ``catdpo_kernels._C`` (csrc/).

With torch importable at build time (``pip install --no-build-isolation -e .``)
the C++ op is compiled ahead of time, plus its CUDA kernel when torch is a CUDA
build and a CUDA toolkit is found. Without torch or a working compiler the
package installs as pure Python; ``catdpo_kernels._ext`` then JIT-builds the
same sources on first use, or falls back to pure torch.

Switches: ``CATDPO_BUILD_EXT=0`` skips the extension, ``CATDPO_BUILD_CUDA=0``
builds it CPU-only. ``MAX_JOBS`` bounds ninja's parallelism.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _ext_helpers():
    """catdpo_kernels/_ext.py, loaded by path: the build settings live there, once."""
    spec = importlib.util.spec_from_file_location("_catdpo_ext_build_helpers", ROOT / "catdpo_kernels" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _note(msg):
    print(f"catdpo_kernels setup: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (as ``catdpo_kernels/_csrc``) so a wheel can still JIT-build."""

    def run(self):
        super().run()
        if not CSRC.is_dir():
            return
        dest = Path(self.build_lib) / "catdpo_kernels" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in (".cpp", ".cu", ".h"):
                shutil.copy2(src, dest / src.name)


def _extension_setup():
    if os.environ.get("CATDPO_BUILD_EXT", "1") == "0":
        _note("CATDPO_BUILD_EXT=0: pure-Python install")
        return {}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means: no AOT build
        _note(f"torch not importable at build time ({exc!r}): pure-Python install, the op is JIT-built on first use")
        return {}
    helpers = _ext_helpers()
    helpers.configure_cuda_env(gpu_visible=torch.cuda.is_available())
    from torch.utils import cpp_extension

    with_cuda = os.environ.get("CATDPO_BUILD_CUDA", "1") != "0" and helpers.cuda_toolkit_home(cpp_extension) is not None
    sources = [f"csrc/{f}" for f in helpers.CPU_SOURCES]
    include_dirs = [str(CSRC)]
    if with_cuda:
        sources += [f"csrc/{f}" for f in helpers.CUDA_SOURCES]
        include_dirs += helpers.cuda_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
        _note(f"building catdpo_kernels._C with CUDA (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    else:
        ext_cls = cpp_extension.CppExtension
        _note("building catdpo_kernels._C for CPU only (CATDPO_BUILD_CUDA=0, a CPU build of torch, or no nvcc)")
    ext = ext_cls(
        name="catdpo_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=helpers.compile_args(with_cuda),
    )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed compile leaves a working pure-Python install (JIT or fallback at runtime)."""

        failed = False

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                OptionalBuildExtension.failed = True
                _note(f"building {ext.name} failed, installing without it: {exc!r}")

        def run(self):
            # Also covers what follows a failed compile, e.g. copying the missing .so in place.
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                if not OptionalBuildExtension.failed:
                    _note(f"building the extension failed, installing without it: {exc!r}")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


kwargs = _extension_setup()
kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**kwargs)
