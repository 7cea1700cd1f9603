#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 (setup.py's flags, at C++17: the oldest standard a
# supported torch builds them with) without a GPU or torch.
#
#   csrc/cuda/check_compile.sh OUT_DIR
#
# Writes OUT_DIR/<name>.o, OUT_DIR/ptxas.log (nvcc's output with `-Xptxas -v`) and
# OUT_DIR/summary.txt (one line per kernel and architecture: registers, stack frame, spill
# bytes), prints the summary, and exits non-zero when any file fails to compile. NVCC may name
# the compiler (default: nvcc on PATH).
set -euo pipefail

out_dir="${1:?usage: $0 OUT_DIR}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
mkdir -p "$out_dir"
log="$out_dir/ptxas.log"
: >"$log"

failed=0
for source in "$here"/*.cu; do
  name="$(basename "$source" .cu)"
  echo "== $name.cu" >>"$log"
  if ! "$nvcc" -c -std=c++17 -O3 --use_fast_math -lineinfo \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xptxas -v -I "$here" "$source" -o "$out_dir/$name.o" >>"$log" 2>&1; then
    echo "check_compile: $name.cu FAILED to compile (see $log):" >&2
    grep -E "error" "$log" | tail -n 20 >&2 || true
    failed=1
  fi
done

# ptxas prints, per kernel: "Compiling entry function '<mangled>' for 'sm_XX'", then a line with
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
demangle="cat"
for tool in cu++filt c++filt; do
  if command -v "$tool" >/dev/null 2>&1; then demangle="$tool"; break; fi
done
awk '
  /Compiling entry function/ {
    match($0, /function .[^'"'"']+/); kernel = substr($0, RSTART + 10, RLENGTH - 10)
    match($0, /sm_[0-9a-z]+/); arch = substr($0, RSTART, RLENGTH)
  }
  /bytes stack frame/ { stack = $1; spill_st = $5; spill_ld = $9 }
  /Used [0-9]+ registers/ {
    match($0, /Used [0-9]+/); regs = substr($0, RSTART + 5, RLENGTH - 5)
    if (kernel != "") printf "%s regs=%s stack=%s spill_stores=%s spill_loads=%s %s\n", arch, regs, stack, spill_st, spill_ld, kernel
    kernel = ""
  }
' "$log" | $demangle | sed -E 's/(void )?fastgpt::cuda::\(anonymous namespace\):://; s/\(.*$//' | sort -u -t' ' -k1,1 -k6 >"$out_dir/summary.txt"

echo "kernel resources (ptxas, see $out_dir/summary.txt):"
cat "$out_dir/summary.txt"
spilling="$(grep -cv 'spill_stores=0 spill_loads=0' "$out_dir/summary.txt" || true)"
echo "kernels that spill: $spilling"
exit "$failed"
