#!/usr/bin/env bash
# dtrain with the DeepSpeed launcher on one node (backend.name=deepspeed unless BACKEND says otherwise).
#
#   launch/deepspeed_1node.sh [key.sub=value ...]
#   CONFIG=configs/tiny.yaml NPROC=2 launch/deepspeed_1node.sh training.max_steps=10
#
# Env (default): CONFIG (configs/tiny.yaml), NPROC (GPU count, else 2), MASTER_PORT (29500),
# BACKEND (deepspeed), PYTHON (python).
# Works unchanged on a CPU-only node: DS_ACCELERATOR=cpu is set when there is no nvidia-smi and
# dtrain uses gloo (the first run JIT-builds a small shared-memory op with g++/ninja).
# Preemption: send USR1 (or TERM) to the training processes; they checkpoint and exit 75 and the
# launcher stops the rest. Run again with training.resume=auto. Under SLURM use `dtrain slurm`.
set -euo pipefail
CONFIG="${CONFIG:-configs/tiny.yaml}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "${PYTHON:-python}" -m deepspeed.launcher.runner --num_gpus "$NPROC" \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank --module dtrain \
    train "$CONFIG" "backend.name=${BACKEND:-deepspeed}" "$@"
