# Sourced by the launch scripts: how many ranks to start on this node.
# GPUS: GPUs on this node (0 without nvidia-smi: then CPU ranks with gloo, DS_ACCELERATOR=cpu).
# NPROC: ranks per node, default one per GPU, or 2 on a CPU-only node.
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L | grep -c '^GPU' || true)"
else
    GPUS=0
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
if [ "$GPUS" -gt 0 ]; then NPROC="${NPROC:-$GPUS}"; else NPROC="${NPROC:-2}"; fi
