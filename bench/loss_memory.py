"""Activation bytes and time of the loss, chunked vs unchunked, one process on CPU.

    .venv/bin/python bench/loss_memory.py [--batch 2 --seq 512 --chunk 1024]

For the real SmolLM2-135M-Instruct (vocab 49,152) and a random Llama with vocab 128,256 (hidden
512, 8 layers), LoRA on q_proj, v_proj, fp32: the bytes autograd saves for backward in a micro-
batch's forward + loss, counted by dtrain memory's SavedTensorCounter (activations only, parameters
excluded), for the whole step and for the loss alone (= whole - the decoder's own forward), and
the median time of forward + loss + backward. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/loss_memory.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend  # noqa: E402
from dtrain.config import schema as config  # noqa: E402
from dtrain.memory.measure import SavedTensorCounter  # noqa: E402
from dtrain.model import importer

ARCH_128K = [
    "model.arch.model_type=llama",
    "model.arch.vocab_size=128256",
    "model.arch.hidden_size=512",
    "model.arch.intermediate_size=1376",
    "model.arch.num_hidden_layers=8",
    "model.arch.num_attention_heads=8",
    "model.arch.num_key_value_heads=8",
    "model.arch.max_position_embeddings=2048",
    "model.arch.tie_word_embeddings=false",
]


def build(model: list[str], chunked: bool, chunk: int, extra: tuple[str, ...] = ()) -> SingleBackend:
    cfg = config.load(
        common.REPO / "configs" / "tiny.yaml",
        [
            "backend.device=cpu",
            "lora.targets=[q_proj,v_proj]",
            *model,
            f"training.chunked_loss={str(chunked).lower()}",
            f"training.loss_chunk_tokens={chunk}",
            *extra,
        ],
    )
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    return backend


def saved_bytes(backend: SingleBackend, fn) -> int:
    with SavedTensorCounter(backend.model, [p.data for p in backend.model.parameters()]) as c:
        fn()
    return c.activation_bytes


def measure(backend: SingleBackend, batch: dict, iters: int) -> dict:
    ids = batch["input_ids"]
    whole = saved_bytes(backend, lambda: backend.loss(batch))
    decoder = saved_bytes(backend, lambda: backend.model.model(input_ids=ids, use_cache=False))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        total, n = backend.loss(batch)
        (total / n).backward()
        times.append(time.perf_counter() - t0)
    backend.model.zero_grad(set_to_none=True)
    return {"whole": whole, "loss": whole - decoder, "step_s": common.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    smol = [f"model.path={importer.resolve('smollm2-135m-instruct')}", "model.arch=null"]
    print(
        f"batch {args.batch} x {args.seq} tokens, chunk {args.chunk}, torch {torch.__version__}, "
        f"{os.cpu_count()} cores, load {common.loadavg()}\n"
    )
    print("| model | vocab | loss | step activations MiB | loss activations MiB | fwd+loss+bwd s |")
    print("|---|---:|---|---:|---:|---:|")
    for name, model, vocab in (("SmolLM2-135M-Instruct", smol, 49152), ("random Llama 512x8", ARCH_128K, 128256)):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids.clone()}
        rows = {}
        for chunked in (False, True):
            backend = build(model, chunked, args.chunk)
            rows[chunked] = r = measure(backend, batch, args.iters)
            print(
                f"| {name} | {vocab:,} | {'chunked' if chunked else 'logits'} | {r['whole'] / 2**20:,.1f} | "
                f"{r['loss'] / 2**20:,.2f} | {r['step_s']:.2f} |",
                flush=True,
            )
            del backend
        print(
            f"| | | ratio | {rows[False]['whole'] / rows[True]['whole']:.2f}x | "
            f"{rows[False]['loss'] / max(rows[True]['loss'], 1):.1f}x | "
            f"{rows[True]['step_s'] / rows[False]['step_s']:.2f}x time |",
            flush=True,
        )


if __name__ == "__main__":
    main()
