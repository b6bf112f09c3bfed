#!/usr/bin/env bash
# The quickstart: set up, train a LoRA adapter sharded over 2 CPU ranks (FSDP2, gloo) on the
# shipped corpus with a tiny random-weight Llama, then write the memory report for that config.
# Works unchanged on a GPU node (NCCL, CUDA) — the device is chosen automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
NPROC=${NPROC:-2}
BACKEND=${BACKEND:-fsdp}
OUT=${OUT:-runs/quickstart}
.venv/bin/torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
  -m dtrain train configs/tiny.yaml backend.name="$BACKEND" output.dir="$OUT" output.overwrite=true
.venv/bin/torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
  -m dtrain memory configs/tiny.yaml backend.name="$BACKEND" output.dir="$OUT" --overwrite
echo
echo "adapter (PEFT format):  $OUT/adapter/"
echo "metrics:                $OUT/metrics.jsonl"
echo "memory report:          $OUT/memory/memory_report.md"
