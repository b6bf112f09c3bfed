"""Shared test helpers: run dtrain as real processes (1 process, or N ranks under a launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from bench.common import free_port, torchrun  # the one torchrun command line, for tests and benchmarks

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PY = sys.executable

# A fast, deterministic tiny run used by many tests (q_proj/v_proj, no dropout, fp32).
FAST = [
    "lora.targets=[q_proj,v_proj]",
    "training.max_steps=4",
    "training.warmup_steps=2",
    "training.micro_batch_size=4",
    "training.eval_every=0",
    "data.seq_len=32",
    "logging.loss_curve=false",  # matplotlib's import and one render: ~2 s of every run; tests/e2e/test_loggers draws it
]


def env_for_tests(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RANK", None)
    env.update(extra or {})
    return env


def launch_cmd(nproc: int, launcher: str = "torchrun") -> list[str]:
    """The command prefix that starts `nproc` dtrain processes."""
    port = str(free_port())
    if nproc == 1 and launcher == "python":
        return [PY, "-m", "dtrain"]
    if launcher == "deepspeed":
        return [
            PY,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            port,
            "--module",
            "dtrain",
        ]
    return [*torchrun(nproc, int(port)), "-m", "dtrain"]


def run_dtrain(
    args: list[str],
    nproc: int = 1,
    launcher: str = "python",
    timeout: int = 300,
    env: dict | None = None,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    cmd = launch_cmd(nproc, launcher) + args
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env_for_tests(env),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(
    out: Path, overrides: list[str] = (), nproc: int = 1, launcher: str = "python", config: Path = TINY, **kw
) -> subprocess.CompletedProcess:
    """dtrain train on the tiny config (FAST overrides first) into `out`."""
    args = ["train", str(config), *FAST, *overrides, f"output.dir={out}"]
    return run_dtrain(args, nproc=nproc, launcher=launcher, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metrics(out) if "loss" in row]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_losses_and_adapter(a: Path, b: Path, rel: float = 1e-5, atol: float = 2e-6) -> None:
    """Two runs of the same training: equal losses (relative `rel`) and adapters (absolute `atol`)."""
    la, lb = losses(a), losses(b)
    assert la and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert abs(x - y) <= rel * abs(x), (la, lb)
    A, B = adapter(a), adapter(b)
    assert A.keys() == B.keys() and A
    for k in A:
        torch.testing.assert_close(A[k], B[k], rtol=0, atol=atol)
    assert any(A[k].abs().sum() > 0 for k in A if "lora_B" in k)  # B moved off zero


def tiny_shapes(
    r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(base parameter shapes, LoRA A/B shapes) of the tiny Llama, from the YAML's arch."""
    a = yaml.safe_load(TINY.read_text())["model"]["arch"]
    v, h, f, layers = a["vocab_size"], a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    hd = h // a["num_attention_heads"]
    dq, dkv = a["num_attention_heads"] * hd, a["num_key_value_heads"] * hd
    linears = {
        "q_proj": (dq, h),
        "k_proj": (dkv, h),
        "v_proj": (dkv, h),
        "o_proj": (h, dq),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
    }
    assert not a["tie_word_embeddings"]
    base = [(v, h), (v, h), (h,)] + layers * [*linears.values(), (h,), (h,)]
    lora = [s for _ in range(layers) for t in targets for s in ((r, linears[t][1]), (linears[t][0], r))]
    return base, lora


def projection_round_trip_errors(model_dir: Path) -> dict[int, list[float]]:
    """bits -> the relative Frobenius error of every block projection of a real checkpoint after
    dtrain's int8 / NF4 round trip (the weight distribution the quantized-base tests rest on)."""
    from safetensors import safe_open

    from dtrain.model import quant

    errors: dict[int, list[float]] = {8: [], 4: []}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".layers." in key and key.endswith("proj.weight"):
                w = f.get_tensor(key)
                for bits in errors:
                    errors[bits].append(float((quant.round_trip(w, bits) - w).norm() / w.norm()))
    return errors
