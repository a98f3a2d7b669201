#!/usr/bin/env bash
# Build the CUDA extension for the GPU device on this CPU-only machine, into .prebuilt/ (ignored), so that
# scripts/device_check.sh skips its ~100 s build: carry .prebuilt with the device call.
#   bash scripts/prebuild_extension.sh          # torch 2.11.0 (the device's, a CUDA 13.0 build), sm_90a
# How (../shared/BUILD_NOTES.md): a venv with the CUDA build of that torch from PyPI (~5 GB, once), the machine's
# nvcc, CUDA_HOME and CPATH pointing at the toolkit headers that come with torch's nvidia wheels. The module uses
# CPython's stable ABI (setup.py: py_limited_api), so a build made with this machine's Python imports under the
# device's. .prebuilt/ records the csrc hash (scripts/csrc_hash.sh), the torch version and the archs it was built
# for; device_check.sh uses it only when all three match. Env: TORCH_VERSION, TORCH_CUDA_ARCH_LIST, VENV, MAX_JOBS, PREBUILT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0a}  # what the device builds (its TORCH_CUDA_ARCH_LIST)
VENV=${VENV:-/tmp/neox_rt_prebuild_venv}
DIR=${PREBUILT_DIR:-.prebuilt}  # e.g. PREBUILT_DIR=.prebuilt75 TORCH_CUDA_ARCH_LIST="7.5+PTX": the T4 path
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" ninja "setuptools>=70" numpy
fi
SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$SRC"  # the tracked files as they are now, no stale build
t0=$(date +%s)
(cd "$SRC" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} CPATH="$SITE/nvidia/cu13/include" TORCH_CUDA_ARCH_LIST="$ARCHS" \
   MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace)
rm -rf "$DIR" && mkdir "$DIR"
cp "$SRC"/neox_rt/_C*.so "$DIR"/
bash "$SRC"/scripts/csrc_hash.sh > "$DIR"/csrc.sha256  # the sources built, not the tree as it is now
"$VENV/bin/python" -c "import torch; print(torch.__version__)" > "$DIR"/torch_version
echo "$ARCHS" > "$DIR"/archs
echo "prebuilt in $(( $(date +%s) - t0 ))s: $(ls "$DIR"/_C*.so) ($(du -h "$DIR"/_C*.so | cut -f1)), torch \
$(cat "$DIR"/torch_version), archs $ARCHS"
