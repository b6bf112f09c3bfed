#!/usr/bin/env bash
# Sets up dtrain in ./.venv from the lock files in requirements/, the exact versions CI tests:
# without an NVIDIA GPU, torch's CPU build (requirements/torch-cpu.txt: no multi-GB CUDA wheels)
# and then requirements/cpu.txt; with one, requirements/cuda.txt. Then dtrain itself, editable and
# --no-deps. The locks hold the test dependencies too (pytest, peft).
#   bash launch/setup.sh               # dtrain + the locked dependencies
#   bash launch/setup.sh --test        # the same + a one-node SLURM (apt) for the SLURM tests
#   bash launch/setup.sh --unlocked    # (or DTRAIN_UNLOCKED=1) whatever pip resolves from
#                                      # pyproject.toml's ranges instead (torch: DTRAIN_TORCH)
#   bash launch/setup.sh --print-lock  # print the lock this machine would use; install nothing
# DTRAIN_LOCK=cpu|cuda picks the lock whatever the GPU; DTRAIN_VENV the venv (default .venv).
# The locks are refreshed by launch/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DTRAIN_VENV:-.venv}
TORCH_VERSION=${DTRAIN_TORCH:-2.13.0}
PY=${PYTHON:-python3}
TEST=0 PRINT=0 UNLOCKED=${DTRAIN_UNLOCKED:-0}
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --unlocked) UNLOCKED=1 ;;
    --print-lock) PRINT=1 ;;
    *) echo "setup: unknown argument $arg (--test, --unlocked, --print-lock)" >&2; exit 2 ;;
  esac
done
case "$UNLOCKED" in 0 | "") UNLOCKED=0 ;; *) UNLOCKED=1 ;; esac

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
KIND=${DTRAIN_LOCK:-}
if [ -z "$KIND" ]; then
  if has_gpu; then KIND=cuda; else KIND=cpu; fi
fi
case "$KIND" in
  cpu) LOCKS=(requirements/torch-cpu.txt requirements/cpu.txt) ;;
  cuda) LOCKS=(requirements/cuda.txt) ;;
  *) echo "setup: DTRAIN_LOCK must be cpu or cuda, not $KIND" >&2; exit 2 ;;
esac
if [ "$PRINT" = 1 ]; then
  if [ "$UNLOCKED" = 1 ]; then echo "unlocked $KIND pyproject.toml"; else echo "locked $KIND ${LOCKS[*]}"; fi
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# torch's CPU build (exact version in $1): from a local wheel directory if pip is configured with
# one (offline), else from PyTorch's CPU index. No dependencies here: they come after.
install_cpu_torch() {
  if ! pip install --no-deps --no-index "$@" 2>/dev/null; then
    pip install --no-deps "$@" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
}

if [ "$UNLOCKED" = 1 ]; then
  echo "setup: unlocked install from pyproject.toml's ranges, torch $TORCH_VERSION"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ "$KIND" = cuda ]; then
      pip install "torch==$TORCH_VERSION"
    else
      install_cpu_torch "torch==$TORCH_VERSION"
      pip install "torch==$TORCH_VERSION"  # its dependencies, from the usual index
    fi
  fi
  if [ "$TEST" = 1 ]; then pip install -e ".[test]"; else pip install -e .; fi
else
  echo "setup: installing from ${LOCKS[*]}"
  if [ "$KIND" = cpu ]; then
    want=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements/torch-cpu.txt)
    have=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" \
      2>/dev/null || true)
    [ "$have" = "$want" ] || install_cpu_torch -r requirements/torch-cpu.txt
    pip install --require-hashes --no-deps -r requirements/cpu.txt
  else
    pip install --require-hashes --no-deps -r requirements/cuda.txt
  fi
  # setuptools (the build backend) is in the lock: no isolated build env to fetch
  pip install --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -m pip --disable-pip-version-check check >/dev/null \
    || echo "setup: warning: \`$VENV/bin/python -m pip check\` reports conflicts (packages outside the lock?)"
fi
if [ "$TEST" = 1 ]; then
  bash .ci/install_slurm.sh || echo "setup: SLURM not installed; the SLURM tests will be skipped"
fi
"$VENV/bin/python" -c "import torch, dtrain; print(f'dtrain {dtrain.__version__} ready (torch {torch.__version__}) in $VENV')"
