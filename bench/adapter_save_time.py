"""Adapter save time against base size: FSDP2 and ZeRO-3, 2 ranks, two bases about 4x apart.

    python bench/adapter_save_time.py [--layers 4 16] [--backends fsdp deepspeed] [--repeats 5]

The adapter is the same for both bases (r=8 on layer 0's q_proj and v_proj, via lora.target_regex);
the base grows by its number of layers. Printed per (base, backend), medians of wall time:
gathering the LoRA tensors (`adapter.gather_adapter`), `adapter.save_adapter` (that gather +
rank 0 writes atomically), a whole training checkpoint (`save_training`: + optimizer shards, RNG,
checksums), and for contrast gathering the whole model (`backend.full_state` of every parameter:
what a save that gathered the base would pay). The first three stay flat as the base grows; the
last grows with it. Times of a few ms are dominated by fsync and barriers: noisy on busy machines.
Each cell is a fresh `torchrun --nproc_per_node 2` of this file in --worker mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (
    None,
    "",
):  # run as `python bench/adapter_save_time.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

REPO = common.REPO
ARCH = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}


def worker(layers: int, backend_name: str, repeats: int, out: Path) -> None:
    """One cell, on every rank: build, then time the saves; rank 0 prints one JSON line."""
    from dtrain import backends, data, lora
    from dtrain.backends import env as dist
    from dtrain.config import schema as config
    from dtrain.lora import peft_format as adapter
    from dtrain.training import checkpoint

    overrides = [f"model.arch.{k}={v}" for k, v in {**ARCH, "num_hidden_layers": layers}.items()]
    cfg = config.load(
        REPO / "configs" / "tiny.yaml",
        [
            *overrides,
            f"data.path={REPO / 'dtrain' / 'assets' / 'tiny_corpus.txt'}",
            f"backend.name={backend_name}",
            r"lora.target_regex=layers\.0\.self_attn\.(q|v)_proj",
            "training.max_steps=10",
            f"output.dir={out}",
        ],
    )
    env = dist.detect(cfg.backend.device, cfg.backend.dist_backend)
    backend = backends.create(cfg, env)
    backend.build()
    backend.setup_optimizer(10)
    plan = data.BatchPlan(64, 1, 1, env.world_size, 0)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            backend.barrier()
            start = time.perf_counter()
            fn()
            backend.barrier()
            times.append(time.perf_counter() - start)
        return common.median(times)

    trainable, total = lora.count_parameters(backend.model)
    row = {
        "base_params": total - trainable,
        "lora_params": trainable,
        "backend": backend_name,
        "gather_s": timed(lambda: adapter.gather_adapter(backend, cfg.lora.adapter_name)),
        "adapter_s": timed(lambda: adapter.save_adapter(backend, cfg, out / "adapter")),
        "checkpoint_s": timed(lambda: checkpoint.save_training(backend, cfg, out, 1, plan)),
        "full_gather_s": timed(lambda: backend.full_state(lambda n: True)),
        "adapter_file_bytes": (out / "adapter" / adapter.ADAPTER_WEIGHTS).stat().st_size if env.rank == 0 else 0,
    }
    if env.rank == 0:
        print("ROW " + json.dumps(row), flush=True)
    backend.close()


def run_cell(layers: int, backend: str, repeats: int) -> dict:
    env = dict(common.child_env(cuda=False), PYTHONWARNINGS="ignore")  # the same launch and environment as run.py
    with tempfile.TemporaryDirectory() as tmp:
        cmd = common.torchrun(2) + [
            __file__,
            "--worker",
            "--layers",
            str(layers),
            "--backends",
            backend,
            "--repeats",
            str(repeats),
            "--out",
            tmp,
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, errors="replace")
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"{backend} with {layers} layers failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return rows[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--backends", nargs="+", default=["fsdp", "deepspeed"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.layers[0], a.backends[0], a.repeats, a.out)
        from dtrain.backends.env import exit_now

        exit_now(0)  # a rank leaves without interpreter teardown (gloo can abort there)
    rows = [run_cell(n, b, a.repeats) for b in a.backends for n in a.layers]
    print(
        f"{'base params':>12} {'lora params':>11} {'backend':>9} {'lora gather s':>13} {'adapter save s':>14} "
        f"{'checkpoint s':>12} {'full gather s':>13} {'adapter file B':>14}"
    )
    for r in rows:
        print(
            f"{r['base_params']:>12,} {r['lora_params']:>11,} {r['backend']:>9} {r['gather_s']:>13.4f} {r['adapter_s']:>14.4f} "
            f"{r['checkpoint_s']:>12.4f} {r['full_gather_s']:>13.4f} {r['adapter_file_bytes']:>14,}"
        )
    for b in a.backends:
        cells = [r for r in rows if r["backend"] == b]
        small, big = cells[0], cells[-1]
        print(
            f"{b}: base x{big['base_params'] / small['base_params']:.2f} -> lora gather "
            f"x{big['gather_s'] / small['gather_s']:.2f}, adapter save x"
            f"{big['adapter_s'] / small['adapter_s']:.2f}, checkpoint x{big['checkpoint_s'] / small['checkpoint_s']:.2f}, "
            f"full gather x{big['full_gather_s'] / small['full_gather_s']:.2f}"
        )


if __name__ == "__main__":
    main()
