#!/usr/bin/env bash
# The newest releases pyproject.toml allows, checked on purpose rather than met by accident: builds
# a separate venv (.venv-latest, rebuilt each run) from pyproject.toml's ranges without the lock,
# prints how its versions differ from the lock, and runs the tests with it.
#   bash launch/check_latest.sh                 # the whole suite (10-15 min on 2 cores)
#   bash launch/check_latest.sh tests/unit -x   # or any pytest arguments
# torch: on a machine without an NVIDIA GPU the newest release that has a CPU build (X.Y.Z+cpu,
# from PyTorch's CPU index or a local wheel directory pip is configured with); with one, the
# newest PyPI build. pip's own configuration still applies: a constraint file that caps torch (as on the build
# machines, /etc/xdg/pip/constraints.txt) caps it here too, so "newest" means newest allowed.
# Exit status: pytest's (1 when a test fails on the newest releases: fix dtrain or narrow the
# range in pyproject.toml, then refresh the lock with launch/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DTRAIN_LATEST_VENV:-.venv-latest}
PY=${PYTHON:-python3}
export DTRAIN_VENV=$VENV
kind=$(bash launch/setup.sh --print-lock | cut -d' ' -f2)

rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "check_latest: building $VENV from pyproject.toml's ranges ($kind machine)"
if [ "$kind" = cuda ]; then
  pip install torch
else
  # The newest release with a CPU build: try X.Y.Z+cpu for the newest releases in turn (pip's
  # constraint file, if any, rules some out). An exact +cpu pin, so that no CUDA build can slip in.
  got=
  for v in $("$VENV/bin/python" -m pip index versions torch 2>/dev/null \
      | sed -n 's/^Available versions: //p' | tr -d ',' | tr ' ' '\n' | sed 's/+.*//' | uniq \
      | head -n 8); do
    if pip install --no-deps "torch==$v+cpu" --index-url https://download.pytorch.org/whl/cpu \
        --timeout 20 --retries 0 2>/dev/null; then got=$v; break; fi
  done
  [ -n "$got" ] || { echo "check_latest: found no CPU build of torch" >&2; exit 2; }
  pip install "torch==$got"  # its dependencies, from the usual index
fi
pip install -e ".[test]"  # everything else: the newest releases the ranges allow
"$VENV/bin/python" -m pip --disable-pip-version-check check || true

echo "check_latest: versions in $VENV against the $kind lock:"
"$VENV/bin/python" -m dtrain env --lock-kind "$kind" | sed -n '/^packages:/,/^devices:/p;/^lock/,$p'
[ $# -gt 0 ] || set -- -q
echo "check_latest: $VENV/bin/python -m pytest $*"
DTRAIN_UNLOCKED=1 exec "$VENV/bin/python" -m pytest "$@"
