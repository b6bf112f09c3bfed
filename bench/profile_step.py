"""Where a LoRA step spends its time: torch.profiler over forward + loss + backward + AdamW step.

    .venv/bin/python bench/profile_step.py [--model smollm2|llama128k] [--batch 4 --seq 128]

One process on CPU, fp32, LoRA r=8 on q_proj, v_proj, the chunked loss as configured by auto (on).
Prints the operators with the largest self CPU time (a markdown table) and their share of the step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as `python bench/profile_step.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loss_memory import ARCH_128K, build  # noqa: E402
from dtrain.model import importer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "llama128k"], default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunked", choices=["true", "false"], default="true")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if args.model == "smollm2":
        model, vocab = [f"model.path={importer.resolve('smollm2-135m-instruct')}", "model.arch=null"], 49152
    else:
        model, vocab = ARCH_128K, 128256
    backend = build(model, args.chunked == "true", 1024)
    backend.setup_optimizer(10)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}

    def step() -> None:
        total, n = backend.loss(batch)
        backend.backward(total / n)
        backend.step()

    step()  # warm-up: allocator, Adam state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    whole = sum(e.self_cpu_time_total for e in events)
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens, chunked loss {args.chunked}: "
        f"profiled step {whole / 1e6:.2f} s of self CPU time\n"
    )
    print("| operator | calls | self CPU s | share |")
    print("|---|---:|---:|---:|")
    for e in events[: args.top]:
        print(
            f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | {100 * e.self_cpu_time_total / whole:.1f}% |"
        )


if __name__ == "__main__":
    main()
