#!/usr/bin/env bash
# The lowest supported versions, tested: torch 2.11 and triton 3.6 (the versions GPU machines
# often carry), with the NumPy that triton 3.6's interpreter needs (it fails with NumPy >= 2.4).
#
# A fresh virtual environment outside the source tree gets those versions and a wheel of this
# package built against them (CPU extension only: the CUDA build is covered by the main job), and
# runs the tests from outside the tree, so that the wheel, not the sources, is what is imported.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# The CUDA build is covered by the main job; the tests read this too (no CUDA kernel expected).
export CATDPO_BUILD_CUDA=0
"$VPY" -m pip install -q "torch==2.11.*" "triton==3.6.*" "numpy<2.4" "setuptools>=69" wheel ninja pybind11
# Built from a clean copy: objects that a build against another torch left under build/ would
# otherwise be linked into this one (the ninja dependency files name that torch's headers).
mkdir "$WORK/src"
tar -C "$REPO" --exclude=./.git --exclude=./build --exclude=./build-cmake --exclude='*.so' --exclude=.venv \
    --exclude=./outputs -cf - . | tar -C "$WORK/src" -xf -
"$VPY" -m pip install -q --no-build-isolation "$WORK/src[dev]"
cd "$WORK"  # from here on the installed wheel is imported, not the sources
"$VPY" - <<'PY'
import numpy, torch, triton
from catdpo_kernels import _ext

source = _ext.extension_source()
print("lower bounds: torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__, "extension", source)
if source != "aot":
    raise SystemExit(f"the wheel's compiled extension did not load ({source}): {_ext.build_info()}")
PY
"$VPY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    -n 2 -m "not slow" \
    --ignore "$REPO/tests/test_cmake_build.py" --ignore "$REPO/tests/test_ext.py" --ignore "$REPO/tests/test_style.py" \
    "$REPO/tests"
