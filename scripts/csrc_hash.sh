#!/usr/bin/env bash
# One hash of everything the CUDA extension is built from (csrc/ without csrc/standalone/, which setup.py leaves
# out, and setup.py): a prebuilt extension (scripts/prebuild_extension.sh) is used by scripts/device_check.sh only
# while this hash is unchanged.
cd "$(dirname "$0")/.."
find csrc setup.py -type f -not -path 'csrc/standalone/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
