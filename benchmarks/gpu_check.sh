#!/usr/bin/env bash
# One command for a GPU machine (torch + triton preinstalled as python3, no network):
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# Stages in priority order, each under `timeout` with a budget carved from one overall deadline
# (CATDPO_GPU_CHECK_BUDGET seconds, default 330: done within 6 minutes, room for a rerun inside a
# 15-minute allowance). Every stage writes its results as it goes, so a stage cut short keeps them.
#
#   stage            expected on an H100/H200   limit   writes
#   1 build          60-90 s (one .cu file)     150 s   log.txt; on failure a note, and CATDPO_NO_JIT=1
#                                                       for everything after (no JIT rebuild per process)
#   2 gpu tests      30-60 s (-n 8: Triton       90 s   tests.log: -m gpu, and the triton cases of the
#                    compiles in parallel)              correctness / fused-head / fault modules, on CUDA
#                                                       (never the interpreter: triton 3.6 + NumPy >= 2.4
#                                                       break it)
#   3 target shapes  90-150 s                   150 s   <device>_<time>.json/.md: 8x2048x128256 bf16, naive,
#                                                       compiled, triton (+ in place), copy bandwidth;
#                                                       <device>_head_<time>.json/.md: 8x2048x4096x128256 bf16, naive,
#                                                       compiled, triton, frozen, and the peers present
#                                                       (GEMM peak measured per case)
#   4 other shapes   rest of the budget          rest   appended to the logits results if time is left
#   5 summary        < 5 s                              summary.md (also printed)
#
# Peers missing from the machine (trl, liger-kernel, cut-cross-entropy) are installed from wheels
# in $CATDPO_WHEELS (default: .whl/ in the repository) when that folder exists, without network.
#
# $OUT gets at most 8 files: log.txt, tests.log, summary.md, <device>_<time>.json/.md,
# <device>_head_<time>.json/.md (named as catdpo-bench --save-results names them, so they go into
# benchmarks/results/ unchanged), bench.png.
#
# Dry run without a GPU (tiny CPU shapes, triton rows skipped; the control flow only):
#     CATDPO_GPU_CHECK_ALLOW_CPU=1 CATDPO_GPU_CHECK_SKIP_INSTALL=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh
# Other switches: CATDPO_GPU_CHECK_SKIP_TESTS=1, CATDPO_GPU_CHECK_PIP="<install command>", PYTHON=python3.

set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
TESTS_LOG="$OUT/tests.log"
SUMMARY="$OUT/summary.md"
: >"$LOG"
: >"$TESTS_LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

BUDGET=${CATDPO_GPU_CHECK_BUDGET:-330}
DEADLINE=$((SECONDS + BUDGET))
STAGES=()   # "name|status|seconds|note"

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# seconds for a stage: min(want, time left minus what later stages reserve)
stage_time() {
    local want=$1 reserve=$2 left
    left=$((DEADLINE - SECONDS - reserve))
    if ((left < want)); then echo "$left"; else echo "$want"; fi
}

# run_stage NAME SECONDS LOGFILE CMD...: CMD under timeout, output to the terminal, LOG (and LOGFILE)
run_stage() {
    local name=$1 secs=$2 extra_log=$3
    shift 3
    if ((secs < 15)); then
        say "== $name: skipped (only ${secs}s left of the ${BUDGET}s budget)"
        STAGES+=("$name|skipped|0|out of time")
        return 124
    fi
    say ""
    say "== $name (limit ${secs}s): $*"
    local start=$SECONDS rc
    if [[ -n $extra_log ]]; then
        timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG" "$extra_log"
    else
        timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG"
    fi
    rc=$?
    local took=$((SECONDS - start)) status=ok
    if ((rc == 124 || rc == 137)); then
        status="timeout"
    elif ((rc != 0)); then
        status="failed (rc=$rc)"
    fi
    say "== $name: $status after ${took}s"
    STAGES+=("$name|$status|$took|")
    return "$rc"
}

note() { STAGES+=("$1|note|0|$2"); say "NOTE ($1): $2"; }

# ------------------------------------------------------------------ device
say "catdpo_kernels gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO, results in $OUT, budget ${BUDGET}s"
DEVICE_INFO=$("$PY" - <<'EOF' 2>&1
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({type(exc).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {p.major}.{p.minor} {p.name} | torch {torch.__version__} | triton {tv}")
else:
    print(f"cpu - | torch {torch.__version__} | triton {tv}")
EOF
)
say "device: $DEVICE_INFO"
if [[ $DEVICE_INFO == cuda* ]]; then
    ON_GPU=1
    ARCH=$(awk '{print $2}' <<<"$DEVICE_INFO")
elif [[ ${CATDPO_GPU_CHECK_ALLOW_CPU:-0} == 1 ]]; then
    ON_GPU=0
    ARCH=""
    note device "no CUDA device: CPU dry run with tiny shapes (CATDPO_GPU_CHECK_ALLOW_CPU=1)"
else
    say "no CUDA device visible (python3 says: $DEVICE_INFO); set CATDPO_GPU_CHECK_ALLOW_CPU=1 for a CPU dry run"
    exit 2
fi

# ------------------------------------------------------------------ peers from local wheels
WHEELS=${CATDPO_WHEELS:-$REPO/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    PEERS=/tmp/catdpo_peers
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$PEERS" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$PEERS"
        note peers "installed from $WHEELS: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    else
        note peers "installing the wheels in $WHEELS failed (see log.txt): peer rows will be skipped"
    fi
fi

# ------------------------------------------------------------------ 1. build
if [[ ${CATDPO_GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
    note build "skipped (CATDPO_GPU_CHECK_SKIP_INSTALL=1): using the package from $REPO via PYTHONPATH"
else
    export MAX_JOBS=${MAX_JOBS:-16}
    [[ -n $ARCH ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
    [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
    # shellcheck disable=SC2206
    PIP_CMD=(${CATDPO_GPU_CHECK_PIP:-$PY -m pip install --no-build-isolation --no-deps --no-index -e .})
    run_stage build "$(stage_time 150 180)" "" "${PIP_CMD[@]}" || note build "the install failed or timed out"
fi
# Whatever the build did, no later process may spend its budget on a JIT rebuild.
export CATDPO_NO_JIT=1
EXT_INFO=$(timeout 60 "$PY" -c "from catdpo_kernels import _ext; i = _ext.build_info(); print(i['source'], 'cpu_kernel=%s cuda_kernel=%s' % (i['cpu_kernel'], i['cuda_kernel']), '; '.join(i['errors'])[:300])" 2>&1 | tail -1)
say "extension: $EXT_INFO"
if [[ $ON_GPU == 1 && $EXT_INFO != *cuda_kernel=True* ]]; then
    note extension "the compiled CUDA segment-reduce kernel is not loaded ($EXT_INFO): the torch fallback runs"
fi

# ------------------------------------------------------------------ 2. gpu tests
if [[ ${CATDPO_GPU_CHECK_SKIP_TESTS:-0} == 1 ]]; then
    note tests "skipped (CATDPO_GPU_CHECK_SKIP_TESTS=1)"
elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    note tests "pytest is not installed for $PY: GPU tests not run"
elif [[ $ON_GPU == 0 ]]; then
    note tests "no GPU: the GPU tests are skipped in a dry run"
else
    XDIST=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 8)
    run_stage "gpu tests" "$(stage_time 90 160)" "$TESTS_LOG" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        tests/test_triton_gpu.py tests/test_segment_reduce.py tests/test_opcheck.py \
        tests/test_correctness.py tests/test_linear_loss.py tests/test_faults.py -k "gpu or triton or cuda"
fi

# ------------------------------------------------------------------ 3. target shapes
if [[ $ON_GPU == 1 ]]; then
    LOGITS_ARGS=(--shapes 8x2048x128256 --dtypes bf16 --backends reference,compiled,triton --inplace
        --copy-bandwidth --anchors off --rep-ms 100)
    HEAD_ARGS=(--head --repeats 5)
    OTHER_ARGS=(--shapes 8x2048x32000,8x512x128256 --dtypes bf16 --backends reference,triton --anchors off --rep-ms 50)
else
    LOGITS_ARGS=(--device cpu --shapes 4x64x1000 --dtypes fp32 --backends reference,triton,torch --inplace
        --repeats 1)
    HEAD_ARGS=(--head --device cpu --head-shapes 4x32x16x500 --repeats 1 --rows naive,ours-torch,ours-triton)
    OTHER_ARGS=(--device cpu --shapes 4x16x4000 --dtypes fp32 --backends reference,torch --repeats 1)
fi
rm -f "$OUT"/logits_run.* "$OUT"/head_run.* "$OUT"/logits_other.* "$OUT"/bench.png
run_stage "logits target" "$(stage_time 80 70)" "" "$PY" -m catdpo_kernels.bench "${LOGITS_ARGS[@]}" \
    --no-progress --json "$OUT/logits_run.json" --markdown "$OUT/logits_run.md"
run_stage "head target" "$(stage_time 90 15)" "" "$PY" -m catdpo_kernels.bench "${HEAD_ARGS[@]}" \
    --no-progress --json "$OUT/head_run.json" --markdown "$OUT/head_run.md" --plot "$OUT/bench.png"

# ------------------------------------------------------------------ 4. other shapes
COPY_ARGS=()
COPY_GBPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['copy_bandwidth']['GBps'])" "$OUT/logits_run.json" 2>/dev/null)
[[ -n $COPY_GBPS ]] && COPY_ARGS=(--copy-gbps "$COPY_GBPS")
run_stage "other shapes" "$(stage_time 120 10)" "" "$PY" -m catdpo_kernels.bench "${OTHER_ARGS[@]}" \
    "${COPY_ARGS[@]}" --no-progress --json "$OUT/logits_other.json" --markdown "$OUT/logits_other.md"

# The names benchmarks/results/ uses (those of --save-results): <device>_<time> and <device>_head_<time>.
read -r SLUG TIME < <("$PY" -c "
import json, sys
from catdpo_kernels.bench.env import device_slug
m = json.load(open(sys.argv[1]))['meta']
print(device_slug(m['device']), m['date_utc'][:19].replace(':', '').replace('-', ''))" "$OUT/logits_run.json" 2>/dev/null || echo "run $(date -u +%Y%m%dT%H%M%S)")
LOGITS_NAME="${SLUG}_${TIME}"
HEAD_NAME="${SLUG}_head_${TIME}"
for ext in json md; do
    [[ -f $OUT/logits_run.$ext ]] && mv "$OUT/logits_run.$ext" "$OUT/$LOGITS_NAME.$ext"
    [[ -f $OUT/head_run.$ext ]] && mv "$OUT/head_run.$ext" "$OUT/$HEAD_NAME.$ext"
done
# The other shapes ride along in the logits markdown (one file fewer than the 8 that come back).
if [[ -f $OUT/logits_other.md && -f $OUT/$LOGITS_NAME.md ]]; then
    { echo; echo "## Other shapes"; echo; cat "$OUT/logits_other.md"; } >>"$OUT/$LOGITS_NAME.md"
fi

# ------------------------------------------------------------------ 5. summary
{
    echo "# gpu_check summary"
    echo
    echo "- device: $DEVICE_INFO"
    echo "- extension: $EXT_INFO"
    echo "- finished $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s of the ${BUDGET}s budget"
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    for s in "${STAGES[@]}"; do
        IFS='|' read -r name status took why <<<"$s"
        echo "| $name | $status | $took | $why |"
    done
    if [[ -s $TESTS_LOG ]]; then
        echo
        echo "tests (last lines of the pytest run):"
        echo
        grep -E '(passed|failed|error|skipped|no tests ran)( |,|$)' "$TESTS_LOG" | grep -E '^=+ |^[0-9]+ ' | sed 's/^/    /'
    fi
    echo
    SUMMARY_FILES=()
    for f in "$OUT/$LOGITS_NAME.json" "$OUT/$HEAD_NAME.json" "$OUT/logits_other.json"; do
        [[ -s $f ]] && SUMMARY_FILES+=("$f")
    done
    if ((${#SUMMARY_FILES[@]})); then
        timeout 60 "$PY" -m catdpo_kernels.bench.summary "${SUMMARY_FILES[@]}" 2>&1
    else
        echo "no benchmark results were written"
    fi
} >"$SUMMARY" 2>&1
rm -f "$OUT/logits_other.json" "$OUT/logits_other.md" "$OUT"/.*.tmp.png "$OUT"/.*.json.* "$OUT"/.*.md.* 2>/dev/null
say ""
cat "$SUMMARY" | tee -a "$LOG"
say ""
say "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
