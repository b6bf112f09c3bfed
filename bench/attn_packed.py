"""What packed rows cost in attention: forward + backward of a SmolLM2-shaped Llama (random weights)
on the same positions, packed (position_ids restarting per example: transformers builds a
block-diagonal mask) against the causal fast path (one sequence per row, no mask: sdpa's is_causal),
per attention implementation, with a profile of each (top operators by self CPU time).

    .venv/bin/python bench/attn_packed.py --layers 4 --rows 2 --seq-len 512 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/attn_packed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_of(layers: int, impl: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).float().train()


def batches(rows: int, seq_len: int, example: int):
    """(packed, causal) batches of the same input ids: packed rows of seq_len // example examples."""
    import torch

    ids = torch.randint(3, 49152, (rows, seq_len), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq_len).remainder(example).expand(rows, seq_len).contiguous()
    return {"input_ids": ids, "position_ids": pos}, {"input_ids": ids}


def step(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    hidden = model.model(**batch, use_cache=False).last_hidden_state  # the body: attention is what differs
    hidden.float().square().mean().backward()


def timed(model, batch, reps: int) -> float:
    step(model, batch)  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(model, batch)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def profile(model, batch, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        step(model, batch)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--example", type=int, default=128, help="tokens per packed example")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--impl", default="sdpa,eager")
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    import torch

    packed, causal = batches(a.rows, a.seq_len, a.example)
    for impl in a.impl.split(","):
        model = model_of(a.layers, impl)
        tp, tc = timed(model, packed, a.reps), timed(model, causal, a.reps)
        print(
            f"{impl}: {a.rows} x {a.seq_len} positions, {a.layers} layers, {torch.get_num_threads()} threads: "
            f"packed ({a.example}-token examples) {tp:.3f} s, causal {tc:.3f} s per step "
            f"(packed / causal {tp / tc:.2f}x)"
        )
        for name, b in (("packed", packed), ("causal", causal)):
            print(f"--- {impl} {name}: top operators by self CPU time\n{profile(model, b, a.top)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
