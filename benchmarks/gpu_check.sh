#!/usr/bin/env bash
# One command for a GPU machine (torch + triton preinstalled as python3, no network):
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# Stages, each under `timeout` with a budget carved from one overall deadline
# (CATDPO_GPU_CHECK_BUDGET seconds, default 460, so the whole run ends within 8 minutes):
#
#   1. install   pip install -e . without network or deps; builds the C++/CUDA extension.
#                On failure: a note, CATDPO_NO_JIT=1 for the rest (no JIT build eats the budget).
#   2. gpu tests python3 -m pytest -m gpu tests      -> tests.log
#   3. triton    python3 -m pytest tests/test_correctness.py -k triton (on CUDA when present) -> tests.log
#   4. bench     catdpo-bench with the GPU defaults, --copy-bandwidth (measured once), --inplace
#                -> <device>_<UTC time>.json and .md (--save-results: the names benchmarks/results/ uses),
#                   bench.png; rewritten after every row, so a timeout keeps what was measured
#   5. configs   triton launch configs at 8x2048x128256 bf16, naive row included, copy bandwidth from 4.
#                -> configs.json, configs.md
#   6. summary   stage table + main-case digest -> summary.md (also printed)
#
# Everything printed also goes to log.txt. $OUT gets at most 8 files: log.txt, tests.log,
# <device>_<time>.json, <device>_<time>.md, bench.png, configs.json, configs.md, summary.md.
#
# Dry run without a GPU (tiny CPU shapes, triton rows skipped):
#     CATDPO_GPU_CHECK_ALLOW_CPU=1 CATDPO_GPU_CHECK_SKIP_INSTALL=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh
# Other switches: CATDPO_GPU_CHECK_SKIP_TESTS=1, CATDPO_GPU_CHECK_PIP="<install command>",
# PYTHON=python3.

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

BUDGET=${CATDPO_GPU_CHECK_BUDGET:-460}
DEADLINE=$((SECONDS + BUDGET))
STAGES=()   # "name|status|seconds|note"

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# seconds left for a stage: min(want, time left minus what later stages reserve)
stage_time() {
    local want=$1 reserve=$2 left
    left=$((DEADLINE - SECONDS - reserve))
    if ((left < want)); then echo "$left"; else echo "$want"; fi
}

# run_stage NAME SECONDS LOGFILE CMD...: runs CMD under timeout, output to the terminal, LOG (and LOGFILE)
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
        timeout -k 15 "$secs" "$@" 2>&1 | tee -a "$LOG" "$extra_log"
    else
        timeout -k 15 "$secs" "$@" 2>&1 | tee -a "$LOG"
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

# ------------------------------------------------------------------ 1. install
if [[ ${CATDPO_GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
    note install "skipped (CATDPO_GPU_CHECK_SKIP_INSTALL=1): using the package from $REPO via PYTHONPATH"
else
    export MAX_JOBS=${MAX_JOBS:-16}
    [[ -n $ARCH ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
    [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
    # shellcheck disable=SC2206
    PIP_CMD=(${CATDPO_GPU_CHECK_PIP:-$PY -m pip install --no-build-isolation --no-deps --no-index -e .})
    if ! run_stage install "$(stage_time 120 300)" "" "${PIP_CMD[@]}"; then
        export CATDPO_NO_JIT=1
        note install "pip install failed or timed out: continuing from the source tree (PYTHONPATH) with CATDPO_NO_JIT=1, so the segment-reduce op uses its torch fallback unless an earlier build exists"
    fi
fi
EXT_INFO=$(CATDPO_NO_JIT=1 timeout 60 "$PY" -c "from catdpo_kernels import _ext; i = _ext.build_info(); print(i['source'], 'cpu_kernel=%s cuda_kernel=%s' % (i['cpu_kernel'], i['cuda_kernel']), '; '.join(i['errors'])[:300])" 2>&1 | tail -1)
say "extension: $EXT_INFO"
if [[ $ON_GPU == 1 && $EXT_INFO != *cuda_kernel=True* ]]; then
    note extension "the compiled CUDA segment-reduce kernel is not loaded ($EXT_INFO)"
fi

# ------------------------------------------------------------------ 2-3. tests
if [[ ${CATDPO_GPU_CHECK_SKIP_TESTS:-0} == 1 ]]; then
    note tests "skipped (CATDPO_GPU_CHECK_SKIP_TESTS=1)"
elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    note tests "pytest is not installed for $PY: GPU tests not run"
else
    run_stage "gpu tests" "$(stage_time 80 230)" "$TESTS_LOG" \
        "$PY" -m pytest -m gpu tests -q -p no:cacheprovider
    run_stage "triton backend tests" "$(stage_time 70 190)" "$TESTS_LOG" \
        "$PY" -m pytest tests/test_correctness.py -k triton -q -p no:cacheprovider
fi

# ------------------------------------------------------------------ 4. bench
if [[ $ON_GPU == 1 ]]; then
    BENCH_ARGS=(--inplace --rep-ms 100)
    MAIN_SHAPE=8x2048x128256
    MAIN_DTYPE=bf16
else
    BENCH_ARGS=(--device cpu --shapes 4x64x1000,4x64x4000,4x16x4000 --dtypes fp32 --repeats 1
        --backends reference,triton,compiled,torch --inplace)
    MAIN_SHAPE=4x64x4000
    MAIN_DTYPE=fp32
fi
rm -f "$OUT"/*_[0-9]*T[0-9]*.json "$OUT"/*_[0-9]*T[0-9]*.md
run_stage bench "$(stage_time 240 70)" "" "$PY" -m catdpo_kernels.bench "${BENCH_ARGS[@]}" --copy-bandwidth \
    --no-progress --save-results "$OUT" --plot "$OUT/bench.png"
BENCH_JSON=$(ls -t "$OUT"/*_[0-9]*T[0-9]*.json 2>/dev/null | head -1)

# ------------------------------------------------------------------ 5. triton configs
COPY_ARGS=()
COPY_GBPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['copy_bandwidth']['GBps'])" "${BENCH_JSON:-/dev/null}" 2>/dev/null)
[[ -n $COPY_GBPS ]] && COPY_ARGS=(--copy-gbps "$COPY_GBPS")
CONFIGS=(--triton-config default --triton-config BLOCK_V=8192,num_warps=8 --triton-config BLOCK_V=4096,num_warps=8
    --triton-config BLOCK_V=4096,num_warps=4 --triton-config BLOCK_V=2048,num_warps=4)
[[ $ON_GPU == 0 ]] && CONFIGS=(--device cpu --repeats 1 --triton-config default --triton-config BLOCK_V=4096,num_warps=8)
run_stage "triton configs" "$(stage_time 100 10)" "" "$PY" -m catdpo_kernels.bench --shapes "$MAIN_SHAPE" \
    --dtypes "$MAIN_DTYPE" --backends reference,triton "${CONFIGS[@]}" "${COPY_ARGS[@]}" --no-memory --no-progress \
    --json "$OUT/configs.json" --markdown "$OUT/configs.md"

# ------------------------------------------------------------------ 6. summary
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
        echo "tests (last lines of each pytest run):"
        echo
        grep -E '(passed|failed|error|skipped|no tests ran)( |,|$)' "$TESTS_LOG" | grep -E '^=+ |^[0-9]+ ' | sed 's/^/    /'
    fi
    echo
    SUMMARY_FILES=()
    for f in "${BENCH_JSON:-}" "$OUT/configs.json"; do [[ -n $f && -s $f ]] && SUMMARY_FILES+=("$f"); done
    if ((${#SUMMARY_FILES[@]})); then
        timeout 60 "$PY" -m catdpo_kernels.bench.summary "${SUMMARY_FILES[@]}" 2>&1
    else
        echo "no benchmark results were written"
    fi
} >"$SUMMARY" 2>&1
rm -f "$OUT"/.*.tmp.png "$OUT"/.*.json.* "$OUT"/.*.md.* 2>/dev/null  # leftovers of a write cut short
say ""
cat "$SUMMARY" | tee -a "$LOG"
say ""
say "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
