"""CMakeLists.txt: configure, build (CPU-only, -j2) and run its ctest, then load what it built.

CI runs only ``pytest``, so the CMake build and its C++ test run from here.
Takes about a minute on two cores; skipped only when cmake is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")

pytestmark = pytest.mark.skipif(CMAKE is None or CTEST is None, reason="cmake/ctest not installed")


def run(cmd, cwd, timeout=900, env=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake-build")
    configure = [
        CMAKE,
        "-S",
        str(ROOT),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DCATDPO_WITH_CUDA=OFF",
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run(configure, ROOT)
    run([CMAKE, "--build", str(build), "-j2"], ROOT)
    return build


def test_cmake_build_and_ctest(cmake_build):
    out = run([CTEST, "--output-on-failure"], cmake_build)
    assert "100% tests passed, 0 tests failed out of 1" in out, out
    assert (cmake_build / "libcatdpo_ops.so").is_file()


def test_cmake_library_loads_into_torch(cmake_build):
    """Embedders load the CMake-built library with torch.ops.load_library (fresh process: one registration each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATDPO_")}
    check = "assert out.tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]], out"
    call = "out = torch.ops.catdpo.segment_reduce(torch.ones(4, 2), torch.tensor([0, -1, 7, 0]), 2)"
    library = str(cmake_build / "libcatdpo_ops.so")
    run(
        [sys.executable, "-c", f"import torch\ntorch.ops.load_library({library!r})\n{call}\n{check}"],
        cmake_build,
        timeout=300,
        env=env,
    )
    # The Python module carries the same op; it is imported in its own process.
    assert list(cmake_build.glob("_C*.so")), "CMake did not build the _C Python module"
    module = f"import torch, sys\nsys.path.insert(0, {str(cmake_build)!r})\nimport _C\n"
    module += f"assert _C.build_info()['cuda'] is False\n{call}\n{check}"
    run([sys.executable, "-c", module], cmake_build, timeout=300, env=env)
