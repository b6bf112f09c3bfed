#!/usr/bin/env bash
# On a GPU machine with the wheels of launch/gpu_wheels.sh in wheels/: install them next to the
# machine's own torch / transformers / peft (no network needed), then run every CUDA check once.
#   bash launch/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash launch/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --no-index wheels/*.whl
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -m dtrain env > "$OUT.env.txt" 2>&1 || true
exec "$PY" bench/gpu_check.py --out "$OUT"
