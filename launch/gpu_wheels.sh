#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, transformers, accelerate, peft and safetensors but not
# deepspeed, bitsandbytes, datasets or gguf (and no network): the versions of requirements/cuda.txt,
# for its Python (default 3.12), into wheels/ (ignored by git). DeepSpeed publishes only a source
# archive, so its wheel is built here (pure Python; its CUDA ops compile on first use there).
#   bash launch/gpu_wheels.sh [PYTHON_VERSION]
# Then, on the GPU machine:  bash launch/gpu_check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-.venv/bin/python}
PKGS=(deepspeed bitsandbytes datasets gguf pyarrow dill xxhash multiprocess hjson ninja py-cpuinfo msgpack
      pydantic pydantic-core annotated-types typing-inspection fsspec pandas tzdata python-dateutil)
pin() { grep -E "^$1==" requirements/cuda.txt | head -1 | sed 's/ .*//'; }
rm -rf wheels && mkdir -p wheels
for p in "${PKGS[@]}"; do
  spec=$(pin "$p")
  [ -n "$spec" ] || { echo "gpu_wheels: $p is not in requirements/cuda.txt" >&2; exit 2; }
  if [ "$p" = deepspeed ]; then
    "$PY" -m pip wheel --no-deps -q -w wheels "$spec"
  else
    "$PY" -m pip download --no-deps -q -d wheels --only-binary=:all: --python-version "$PYV" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform any "$spec"
  fi
done
ls wheels
