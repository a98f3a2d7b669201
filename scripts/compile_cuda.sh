#!/usr/bin/env bash
# Compile check of the framework-free CUDA kernels (csrc/kernels/*.cuh) with plain nvcc, no GPU and no torch:
# csrc/standalone/compile_check.cu includes every header and instantiates every launcher for every dtype; it and
# csrc/standalone/decode_probe.cu (the decode-attention probe, trace build) are compiled for sm_75 (T4: no bf16
# arithmetic, no cp.async) and sm_90 (H100). Fails on any error; ptxas register spills are printed as warnings.
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CUDA_ARCHS (default "75 90").
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if ! [ -x "$NVCC" ]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC=...)" >&2
  exit 1
fi
ARCHS=${CUDA_ARCHS:-"75 90"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$NVCC" --version | tail -n 1
pids=()
for arch in $ARCHS; do
  (
    t0=$(date +%s) rc=0
    "$NVCC" -std=c++17 -O3 --use_fast_math -Icsrc -arch=sm_$arch -Xptxas -warn-spills \
      -c csrc/standalone/compile_check.cu -o "$TMP/compile_check_sm$arch.o" > "$TMP/sm$arch.log" 2>&1 || rc=$?
    # the decode-attention probe with its trace build (a tool, but it must keep compiling with the kernel)
    "$NVCC" -std=c++17 -O3 --use_fast_math -Icsrc -arch=sm_$arch -DNEOX_RT_DECODE_TRACE \
      -c csrc/standalone/decode_probe.cu -o "$TMP/decode_probe_sm$arch.o" >> "$TMP/sm$arch.log" 2>&1 || rc=$?
    # the quantized kernels' probe (it launches the fused kernels directly: their signatures must keep matching)
    "$NVCC" -std=c++17 -O3 --use_fast_math -Icsrc -arch=sm_$arch \
      -c csrc/standalone/quant_probe.cu -o "$TMP/quant_probe_sm$arch.o" >> "$TMP/sm$arch.log" 2>&1 || rc=$?
    cat "$TMP/sm$arch.log"
    echo "sm_$arch: rc=$rc, $(( $(date +%s) - t0 ))s"
    exit $rc
  ) &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
if [ "$fail" -ne 0 ]; then
  echo "compile_cuda.sh: FAILED" >&2
  exit 1
fi
echo "compile_cuda.sh: all kernels compile for: $ARCHS"
