#!/usr/bin/env bash
# Compile-only check of every csrc/*.cu for Hopper (sm_90) and Ampere (sm_80), warnings as errors.
#
# Keeps the CUDA kernels honest on machines without a GPU or a CUDA torch: the .cu files include only
# CUDA toolkit headers, so nvcc alone builds them. Nothing is run. Exits non-zero on any error or warning.
#
#   csrc/check_cuda.sh                 # nvcc from PATH (or $NVCC), archs "90 80"
#   CUDA_ARCHS="90" csrc/check_cuda.sh
set -euo pipefail

cd "$(dirname "$0")"
nvcc_bin="${NVCC:-nvcc}"
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "check_cuda: $nvcc_bin not found (set NVCC or put the CUDA toolkit's bin on PATH)" >&2
  exit 1
fi
read -r -a archs <<<"${CUDA_ARCHS:-90 80}"
shopt -s nullglob
sources=(*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda: no .cu sources in $(pwd)" >&2
  exit 1
fi

# Same language flags as setup.py's CUDA build, plus every warning as an error, host side included.
flags=(-std=c++17 -O3 --use_fast_math -lineinfo -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

pids=()
names=()
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    log="$scratch/${src%.cu}.sm_${arch}.log"
    "$nvcc_bin" "${flags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" -c "$src" \
      -o "$scratch/${src%.cu}.sm_${arch}.o" >"$log" 2>&1 &
    pids+=($!)
    names+=("$src sm_${arch}|$log")
  done
done

failed=0
for i in "${!pids[@]}"; do
  name="${names[$i]%%|*}"
  log="${names[$i]#*|}"
  if wait "${pids[$i]}"; then
    echo "check_cuda: ok     $name"
  else
    echo "check_cuda: FAILED $name" >&2
    cat "$log" >&2
    failed=1
  fi
done
"$nvcc_bin" --version | tail -n 2
exit "$failed"
