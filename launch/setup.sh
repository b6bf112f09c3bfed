#!/usr/bin/env bash
# Sets up dtrain in ./.venv: torch first (a CPU build on machines without an NVIDIA GPU, so no
# multi-GB CUDA wheels), then dtrain and its dependencies.
#   bash launch/setup.sh          # runtime
#   bash launch/setup.sh --test   # + test dependencies (pytest, peft) and a one-node SLURM (apt)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DTRAIN_VENV:-.venv}
TORCH_VERSION=${DTRAIN_TORCH:-2.13.0}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION"
  else
    # A CPU wheel: from a local wheel directory if pip is configured with one (torch alone, offline;
    # its dependencies then come from the usual index), else from PyTorch's CPU index.
    if pip install --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null; then
      pip install "torch==$TORCH_VERSION"
    else
      pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi
if [ "${1:-}" = "--test" ]; then
  pip install -e ".[test]"
  bash .ci/install_slurm.sh || echo "setup: SLURM not installed; the SLURM tests will be skipped"
else
  pip install -e .
fi
"$VENV/bin/python" -c "import torch, dtrain; print(f'dtrain {dtrain.__version__} ready (torch {torch.__version__}) in $VENV')"
