#!/usr/bin/env bash
# dtrain with the DeepSpeed launcher on several nodes listed in a hostfile (see hostfile.example).
#
# a) from the first host; DeepSpeed starts every node over passwordless ssh (pdsh):
#      HOSTFILE=launch/hostfile MASTER_ADDR=node0 launch/deepspeed_multinode.sh [key.sub=value ...]
# b) without ssh: run the same command on every node, each with its NODE_RANK:
#      HOSTFILE=launch/hostfile MASTER_ADDR=node0 NODE_RANK=1 launch/deepspeed_multinode.sh [...]
#
# Env (default): HOSTFILE (launch/hostfile), MASTER_ADDR (first host of HOSTFILE), MASTER_PORT (29500),
# NODE_RANK (unset: mode a), CONFIG (configs/tiny.yaml), BACKEND (deepspeed), LAUNCHER (pdsh), PYTHON.
# Works unchanged on CPU-only nodes (gloo, DS_ACCELERATOR=cpu set here when there is no nvidia-smi).
# In mode a) DeepSpeed does not forward DS_ACCELERATOR to the other nodes: on CPU-only nodes put the
# line DS_ACCELERATOR=cpu into ~/.deepspeed_env on the first host (the launcher exports what it lists).
set -euo pipefail
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[ -f "$HOSTFILE" ] || { echo "no hostfile $HOSTFILE (see launch/hostfile.example)" >&2; exit 2; }
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}"
CONFIG="${CONFIG:-configs/tiny.yaml}"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
MODE=(--launcher "${LAUNCHER:-pdsh}")
[ -n "${NODE_RANK:-}" ] && MODE=(--no_ssh --node_rank "$NODE_RANK")
exec "${PYTHON:-python}" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${MODE[@]}" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module dtrain \
    train "$CONFIG" "backend.name=${BACKEND:-deepspeed}" "$@"
