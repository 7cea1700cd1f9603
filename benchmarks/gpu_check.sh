#!/usr/bin/env bash
# The whole GPU check in one call, for a fresh GPU machine with no network:
# build the extension with CUDA, run the test suite on CUDA, then `fastgpt bench --quick --device cuda`
# for every op and the model. Within 8 minutes on an H100: every step runs under `timeout`, capped
# by what is left of the overall budget, and a failed step does not stop the ones after it.
#
#   benchmarks/gpu_check.sh [OUTDIR]        (OUTDIR defaults to $OUT)
#
# OUTDIR receives at most 7 files: gpu_check.log (every step's output), bench-cuda.json (all
# measurements, one JSON), its plots bench-cuda-{attention,add_layer_norm,model}.png, window-cuda.json
# (benchmarks/window_attention.py) and summary.md — the one-screen summary that is also printed last
# on stdout.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 465: whole script, seconds),
# GPU_CHECK_SKIP (steps to leave out, e.g. "build tests") and GPU_CHECK_DEVICE=cpu rehearse the
# script on a machine without a GPU.

set -u
OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
    echo "usage: $0 OUTDIR   (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2 # the repository root
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
LOG="$OUTDIR/gpu_check.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-465}))
RESERVE=20 # seconds kept for merging results, plotting and printing the summary
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
: >"$LOG"
STEPS=()
FAILED=0

# step NAME LIMIT_S COMMAND...: run COMMAND (output to the log) for at most LIMIT_S seconds,
# fewer when the overall budget runs short; record ok / failed (rc) / timed out / skipped.
step() {
    local name=$1 limit=$2
    shift 2
    case " ${GPU_CHECK_SKIP:-} " in *" $name "*) return 0 ;; esac
    local left=$((DEADLINE - RESERVE - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        STEPS+=("$(printf '%-20s %-24s %5s' "$name" "SKIPPED: no time left" "-")")
        FAILED=1
        return 1
    fi
    echo "===== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$(date +%s) rc status
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT (${limit}s)" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=1
    echo "===== $name: $status after $(($(date +%s) - t0))s" >>"$LOG"
    STEPS+=("$(printf '%-20s %-24s %5s' "$name" "$status" "$(($(date +%s) - t0))s")")
    return $rc
}

# 1. what this machine is
step environment 30 bash -c "nvidia-smi; $PY - <<'EOF'
import importlib.util, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ('triton', 'matplotlib', 'safetensors', 'tqdm', 'pytest_benchmark', 'flash_attn'):
    print(name, 'present' if importlib.util.find_spec(name) else 'MISSING')
EOF
nvcc --version | tail -2"
HAVE_MPL=$($PY -c "import matplotlib" 2>/dev/null && echo yes || echo no)

# 2. build the extension with CUDA, for this GPU's architecture only (half the compile time)
ARCH=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
step build 170 env FASTGPT_CUDA=1 FASTGPT_CUDA_ARCHS="${FASTGPT_CUDA_ARCHS:-$ARCH}" MAX_JOBS="${MAX_JOBS:-16}" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
step backends 30 $PY -c "import json, fastgpt; print(json.dumps(fastgpt.backends(), indent=1))"
BACKENDS=$(
    timeout 30 $PY - 2>&1 <<'EOF' | tail -1
from fastgpt.bench import backend_report
report = backend_report().items()
print(", ".join(f"{k}: " + ("yes" if v["available"] else f"NO ({v['reason'][:60]})") for k, v in report))
EOF
)

# 3. the test suite on CUDA (the ahead-of-time Triton and nvcc compile checks need no GPU: CI runs
# them), in one process per two cores up to 8: compiling the Triton kernels the tests cover is
# most of its time, and that is CPU work
SHARDS=$(($(nproc) / 2))
[ "$SHARDS" -gt 8 ] && SHARDS=8
[ "$SHARDS" -lt 1 ] && SHARDS=1
step tests 180 env PYTHON="$PY" bash benchmarks/pytest_sharded.sh "$SHARDS" tests \
    --ignore=tests/test_attention_triton_aot.py --ignore=tests/test_add_layer_norm_triton_aot.py \
    --ignore=tests/test_cuda_sources.py

# 4. quick benchmarks, one step per op so a stuck one cannot starve the others
for op_limit in attention:100 add_layer_norm:60 model:75; do
    op=${op_limit%%:*}
    step "bench-$op" "${op_limit##*:}" $PY -m fastgpt.bench --quick --device "$DEVICE" --op "$op" --out "$WORK/$op"
done

# 4b. a sliding window at 16k tokens against SDPA with the window as a mask (issue 15), quick: one case
step window 60 $PY benchmarks/window_attention.py --device "$DEVICE" --quick --out "$OUTDIR/window-$DEVICE.json"

# 5. one JSON, the plots, and the summary
# (a bench step stopped by its timeout still leaves the JSON of what it measured, and is plotted here)
JSONS=""
for op in attention add_layer_norm model; do
    [ -f "$WORK/$op/results.json" ] && JSONS="$JSONS $WORK/$op/results.json"
done
{
    echo "# fastgpt GPU check — $(date -u +%FT%TZ), $(($(date +%s) - START))s"
    echo
    echo '```'
    printf '%-20s %-24s %5s\n' step status time
    printf '%s\n' "${STEPS[@]}"
    echo "backends: $BACKENDS"
    [ "$HAVE_MPL" = yes ] || echo "plots skipped: matplotlib is not installed"
    grep -h "^ERROR " "$LOG" | head -5
    grep -h -E "^(FAILED|ERROR) tests/" "$LOG" | head -5
    echo '```'
    echo
    if [ -n "$JSONS" ]; then
        # shellcheck disable=SC2086
        timeout 60 $PY benchmarks/report.py --compact --merge-out "$OUTDIR/bench-$DEVICE.json" --plots "$OUTDIR" $JSONS 2>&1
    else
        echo "no benchmark results (see gpu_check.log)"
    fi
} >"$OUTDIR/summary.md"
cat "$OUTDIR/summary.md"
exit $FAILED
