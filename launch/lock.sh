#!/usr/bin/env bash
# Refreshes the lock files in requirements/ from pyproject.toml (runtime dependencies + the `test`
# extra) with uv's `uv pip compile --generate-hashes`:
#   requirements/cpu.txt        CPU machines: every package except torch, exact versions + hashes
#   requirements/torch-cpu.txt  CPU machines: torch's CPU build (X.Y.Z+cpu), exact version, no hash
#   requirements/cuda.txt       CUDA machines: every package, torch from PyPI with its nvidia-* and
#                               triton wheels, exact versions + hashes
# Both are resolved for Linux x86_64 (manylinux_2_28) and Python 3.11, the CI machines'.
#
#   bash launch/lock.sh                                 # re-resolve: keeps every pin that still fits
#                                                       # pyproject.toml (adds new dependencies)
#   bash launch/lock.sh --upgrade                       # newest releases pyproject.toml allows
#   bash launch/lock.sh --upgrade-package transformers  # move one package (repeatable)
#   DTRAIN_TORCH=2.14.0 bash launch/lock.sh             # move torch (default: the locked version)
# Then run the suite on the new lock (bash launch/setup.sh --test && .venv/bin/python -m pytest -q)
# before committing it.
#
# Why torch-cpu.txt carries no hash: the CPU build is not on PyPI. setup.sh installs it from a local
# wheel directory when pip is configured with one, else from PyTorch's CPU index
# (download.pytorch.org), and a hash taken from one source is not known to match the other's file
# (the local wheel could not be compared here: that index is not reachable from the build
# machines). pip's hash checking is all or nothing per install command, so setup.sh installs torch
# from torch-cpu.txt first (--no-deps, exact version) and then cpu.txt with --require-hashes.
# cpu.txt is resolved against the CPU wheel's own metadata, so torch's dependencies are in it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYVER=3.11
PLATFORM=x86_64-manylinux_2_28
locked_torch=$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' requirements/torch-cpu.txt 2>/dev/null || true)
TORCH_VERSION=${DTRAIN_TORCH:-${locked_torch:-2.13.0}}

if command -v uv >/dev/null 2>&1; then
  UV=uv
else  # a tool venv of its own, so that no project venv gains uv
  UV=.venv-tools/bin/uv
  if [ ! -x "$UV" ]; then
    "${PYTHON:-python3}" -m venv .venv-tools
    .venv-tools/bin/python -m pip --disable-pip-version-check -q install "uv==$UV_VERSION"
  fi
fi

# Where the CPU torch wheel comes from: a local wheel directory pip is configured with
# (find-links), else PyTorch's CPU index page for torch (only torch is taken from it).
torch_links=https://download.pytorch.org/whl/cpu/torch/
for d in ${DTRAIN_WHEELS:-} $("${PYTHON:-python3}" -m pip config list 2>/dev/null \
    | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p"); do
  if compgen -G "$d/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then torch_links=$d; break; fi
done

common=(--generate-hashes --python-version "$PYVER" --python-platform "$PLATFORM"
        --extra test --custom-compile-command "bash launch/lock.sh" "$@")
echo "lock: torch $TORCH_VERSION; CPU build from $torch_links"
echo "torch==$TORCH_VERSION+cpu" | "$UV" pip compile pyproject.toml - "${common[@]}" \
  --find-links "$torch_links" --no-emit-package torch -o requirements/cpu.txt
echo "torch==$TORCH_VERSION" | "$UV" pip compile pyproject.toml - "${common[@]}" \
  -o requirements/cuda.txt
cat > requirements/torch-cpu.txt <<EOF
# torch's CPU build for requirements/cpu.txt, written by launch/lock.sh (cpu.txt was resolved
# against this wheel's metadata). No hash: the wheel comes from a local wheel directory or from
# PyTorch's CPU index, see launch/lock.sh. setup.sh installs it with --no-deps before cpu.txt.
torch==$TORCH_VERSION+cpu
EOF
echo "lock: wrote requirements/cpu.txt, requirements/torch-cpu.txt, requirements/cuda.txt"
