#!/usr/bin/env bash
# dtrain on several nodes with torchrun: run this same command on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multinode.sh [key.sub=value ...]   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun_multinode.sh [key.sub=value ...]   # on node1
#
# Env (default): NNODES, NODE_RANK, MASTER_ADDR (all required), MASTER_PORT (29500),
# CONFIG (configs/tiny.yaml), NPROC (GPUs on this node, else 2), BACKEND (fsdp; empty: the config's), PYTHON.
# Works unchanged on CPU-only nodes (gloo; DS_ACCELERATOR=cpu when there is no nvidia-smi).
# The config's data and output.dir must be reachable at the same path on every node; rank 0
# (NODE_RANK=0) writes the checkpoints and the adapter.
# Preemption as in torchrun_1node.sh (USR1/TERM -> checkpoint, exit 75; rerun with training.resume=auto).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-configs/tiny.yaml}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
EXTRA=()
BACKEND="${BACKEND-fsdp}"  # BACKEND= (empty) keeps the config's backend.name
[ -n "$BACKEND" ] && EXTRA+=("backend.name=$BACKEND")
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NPROC" \
    -m dtrain train "$CONFIG" "${EXTRA[@]}" "$@"
