#!/usr/bin/env bash
# dtrain on one node with torchrun: NPROC processes (one per GPU; 2 on a CPU-only node).
#
#   launch/torchrun_1node.sh [key.sub=value ...]
#   CONFIG=configs/tiny.yaml NPROC=2 BACKEND=fsdp launch/torchrun_1node.sh training.max_steps=10
#
# Env (default): CONFIG (configs/tiny.yaml), NPROC (GPU count, else 2), BACKEND (fsdp; deepspeed, or empty
# for the config's backend.name), PYTHON (python).
# Works unchanged on a CPU-only node: dtrain uses gloo on CPU, and DS_ACCELERATOR=cpu is set
# when there is no nvidia-smi.
# Preemption: `kill -USR1 <torchrun pid>` (or -TERM) is forwarded to the workers (PET_SIGNALS_TO_HANDLE);
# they checkpoint at the next step boundary and exit 75, torchrun then exits non-zero. Run the same
# command again with training.resume=auto to continue. Under SLURM use `dtrain slurm` instead.
set -euo pipefail
CONFIG="${CONFIG:-configs/tiny.yaml}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"  # time to checkpoint
EXTRA=()
BACKEND="${BACKEND-fsdp}"  # BACKEND= (empty) keeps the config's backend.name
[ -n "$BACKEND" ] && EXTRA+=("backend.name=$BACKEND")
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m dtrain train "$CONFIG" "${EXTRA[@]}" "$@"
