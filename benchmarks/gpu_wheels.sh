#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on a GPU machine without internet
# (Python 3.12, x86-64; override with GPU_PYTHON=3.11 etc.) into .gpu_wheels/ (git-ignored):
#   jittor 1.3.11    built here from its source release (PyPI has no wheel of it)
#   numpy 1.26.4     Jittor 1.3.11 reads numpy 1.x's array structs: under numpy 2 it silently
#                    returns wrong values, so the check puts numpy 1.26 first on its PYTHONPATH
#   astunparse       needed by Jittor, missing from that machine's image
# Usage: bash benchmarks/gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PYVER=${GPU_PYTHON:-3.12}
LIMIT_MB=40            # the device tool carries at most 64 MiB, repository included

mkdir -p "$DEST"
python -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    numpy==1.26.4 astunparse==1.6.3
python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" jittor==1.3.11.0

ls -l "$DEST"
size_mb=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${size_mb} MiB"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "error: $DEST is over ${LIMIT_MB} MiB; remove stale wheels (one version of each)" >&2
    exit 1
fi
