"""The memory/speed trade of the gradient checkpointing policies, one process on CPU.

    .venv/bin/python bench/ckpt_trade.py [--batch 4 --seq 256 --iters 3]

The real SmolLM2-135M-Instruct (30 blocks), LoRA r=8 on q_proj, v_proj, fp32, chunked loss: for
each policy, the activation bytes a micro-batch's forward + loss saves for backward (dtrain
memory's SavedTensorCounter, which counts a checkpointed block's inputs instead of its saves) and
the median time of forward + loss + backward. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/ckpt_trade.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.loss_memory import build, measure  # noqa: E402
from dtrain.model import importer  # noqa: E402

POLICIES = {
    "none": (),
    "every block": ("model.gradient_checkpointing=true",),
    "every 2nd block": ("model.gradient_checkpointing=true", "model.gradient_checkpointing_every=2"),
    "every 4th block": ("model.gradient_checkpointing=true", "model.gradient_checkpointing_every=4"),
    "attention, every block": ("model.gradient_checkpointing=attention",),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    model = [f"model.path={importer.resolve('smollm2-135m-instruct')}", "model.arch=null"]
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    print(f"SmolLM2-135M-Instruct, {args.batch} x {args.seq} tokens, load {common.loadavg()}\n")
    print("| policy | activations MiB | vs none | fwd+loss+bwd s | vs none |")
    print("|---|---:|---:|---:|---:|")
    ref = None
    for name, extra in POLICIES.items():
        r = measure(build(model, True, 1024, extra), batch, args.iters)
        ref = ref or r
        print(
            f"| {name} | {r['whole'] / 2**20:,.1f} | {r['whole'] / ref['whole']:.2f}x | {r['step_s']:.2f} | "
            f"{r['step_s'] / ref['step_s']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
