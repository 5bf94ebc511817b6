#!/usr/bin/env bash
# The wheelhouse for the GPU check on a machine with no package index (bench/gpu_wheels.py):
#
#     bench/gpu_wheels.sh [DIR] [--limit-mib 60] [--bnb-cuda 130]    # default DIR: .gpu-wheels (git-ignored)
#
# Downloads, for CPython 3.12 on manylinux x86-64, what bench/gpu_check.py's steps import that
# the device image lacks (trl, bitsandbytes, lm-eval, datasets, transformers and peft at
# pyproject.toml's pins, and their needs the image lacks; never torch), prints each wheel's size
# and the total, and fails if the wheels plus the working tree that travels exceed 60 MiB.
# Then, with the device tool: run with carry [".gpu-wheels"], timeout_s 540, command
#     WHEELS=.gpu-wheels BASE=random bash bench/gpu_check.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
[ $# -gt 0 ] && shift
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_wheels.py --dest "$DEST" "$@"
