#!/usr/bin/env bash
# Run a pytest selection in SHARDS processes at once, without pytest-xdist:
#
#   benchmarks/pytest_sharded.sh SHARDS [pytest arguments selecting the tests...]
#
# On a fresh GPU machine most of the test suite's time is compiling Triton kernels (every dtype,
# head dim and layout the tests cover is a new specialization, and an autotuned launch compiles
# each candidate configuration), which is CPU work: shards spread it over the cores while they
# share the GPU. Prints each shard's output in turn; exits non-zero if any shard failed. On
# SIGTERM (a `timeout` around it) the shards are stopped too, so none outlives the step.
set -u
shards=${1:?usage: $0 SHARDS [pytest arguments]}
shift
PY=${PYTHON:-python3}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; cat "$work"/log.* 2>/dev/null; rm -rf "$work"; exit 124' TERM INT

$PY -m pytest "$@" --collect-only -q -p no:cacheprovider >"$work/collected" 2>&1
if ! grep "::" "$work/collected" >"$work/ids"; then
    echo "pytest_sharded: no tests collected:"
    cat "$work/collected"
    rm -rf "$work"
    exit 1
fi
split -n "r/$shards" -d "$work/ids" "$work/ids."
for shard in "$work"/ids.*; do
    [ -s "$shard" ] || continue # fewer tests than shards
    mapfile -t ids <"$shard"
    $PY -m pytest -q -p no:cacheprovider "${ids[@]}" >"$work/log.${shard##*.}" 2>&1 &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
for log in "$work"/log.*; do
    echo "----- shard ${log##*.}"
    cat "$log"
done
echo "pytest_sharded: $(wc -l <"$work/ids") tests in ${#pids[@]} shards: $([ $failed = 0 ] && echo all passed || echo FAILURES)"
rm -rf "$work"
exit $failed
