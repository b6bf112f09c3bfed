"""Run every CUDA path of dtrain once and record the numbers: one prepared script for a GPU machine.

    python bench/gpu_check.py --out OUT            # on a GPU machine (about 10 minutes)
    python bench/gpu_check.py --out OUT --dry-run  # the same plumbing on CPU, tiny sizes (CI-able)

Checks, each a separate process (dtrain's CLI or bench/), each with a timeout, each recorded in
OUT/results.json (and OUT/<check>.log), OUT/summary.md at the end:

  smollm2_bf16    LoRA on the imported SmolLM2-135M-Instruct, bf16, 1 process
  llama1b_bf16    LoRA on a ~1.1B random Llama (TinyLlama's shape), bf16, 1 process
  fsdp_ws1        the same on FSDP2, world size 1 (NCCL)
  zero3_ws1       the same on DeepSpeed ZeRO-3, world size 1 (NCCL, torch_adam: nothing compiles)
  int8, nf4       LoRA on the 8-bit / NF4 base (bitsandbytes' CUDA quantization), loss next to bf16's
  memory          `dtrain memory` on the 1B model (full FT vs LoRA vs 8-bit): measured vs estimate
  bench           bench/run.py's GPU preset: LoRA vs full FT vs PEFT + accelerate (tokens/s, peak
                  CUDA memory, MFU) and merged vs base latency

--dry-run swaps the 1B model for the tiny Llama, runs 2 steps at sequence 32 on CPU with gloo and
`bench/run.py --quick`: what it checks is that every command line, config and output path of the
GPU run works, so the few minutes of a lent GPU are not spent on a typo.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_check.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.presets import (
    LLAMA_1B,  # noqa: E402
    LLAMA_TINY as LLAMA_TINY_MHA,  # noqa: E402
)

REPO, PY = common.REPO, common.PY
# bench/run.py's tiny Llama (presets.LLAMA_TINY) with grouped-query attention (2 kv heads), as the 1B shape has
LLAMA_TINY = {**LLAMA_TINY_MHA, "num_key_value_heads": 2}


@dataclass
class Plan:
    """What one run of the script does: sizes and device, GPU or dry run."""

    dry_run: bool
    out: Path
    steps: int = 20
    seq_len: int = 512
    micro_batch: int = 8
    timeout_s: int = 420

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def arch(self) -> Mapping:
        return LLAMA_TINY if self.dry_run else LLAMA_1B

    @classmethod
    def make(cls, dry_run: bool, out: Path) -> Plan:
        if dry_run:
            return cls(True, out, steps=2, seq_len=32, micro_batch=2, timeout_s=900)
        return cls(False, out)


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    command: list[str]
    numbers: dict = field(default_factory=dict)
    error: str = ""


def arch_overrides(arch: Mapping) -> list[str]:
    return ["model.path=null", *[f"model.arch.{k}={v}" for k, v in arch.items()]]


def train_args(plan: Plan, run: str, extra: list[str]) -> list[str]:
    return [
        "train",
        str(REPO / "configs" / "tiny.yaml"),
        *arch_overrides(plan.arch),
        f"backend.device={plan.device}",
        f"model.dtype={'fp32' if plan.dry_run else 'bf16'}",
        "lora.targets=[q_proj,v_proj]",
        f"training.max_steps={plan.steps}",
        "training.warmup_steps=1",
        f"training.micro_batch_size={plan.micro_batch}",
        f"data.seq_len={plan.seq_len}",
        "training.eval_every=0",
        "training.memory_every=1",
        f"output.dir={plan.out / 'runs' / run}",
        "output.overwrite=true",
        *extra,
    ]


def launcher(nproc: int) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29533",
        "-m",
        "dtrain",
    ]


def checks(plan: Plan) -> dict[str, list[str]]:
    """name -> command line, in run order."""
    dt = [PY, "-m", "dtrain"]
    smol = [
        "train",
        str(REPO / "configs" / "smollm2_dates.yaml"),
        "backend.name=none",
        f"backend.device={plan.device}",
        f"model.dtype={'fp32' if plan.dry_run else 'bf16'}",
        f"training.max_steps={min(plan.steps, 12)}",
        "training.eval_every=0",
        "training.memory_every=1",
        f"output.dir={plan.out / 'runs' / 'smollm2'}",
        "output.overwrite=true",
    ]
    bench = [PY, str(REPO / "bench" / "run.py"), "--no-record", "--keep-workdir"]
    bench += ["--quick"] if plan.dry_run else ["--preset", "gpu", "--steps", "10", "--warmup", "3"]
    memory = [
        "memory",
        *train_args(plan, "memory", [])[1:],
        "--with-8bit",
        "--steps",
        "2",
        "--overwrite",
        "--out",
        str(plan.out / "memory"),
    ]
    return {
        "smollm2_bf16": dt + smol,
        "llama1b_bf16": dt + train_args(plan, "llama1b", ["backend.name=none"]),
        "fsdp_ws1": launcher(1) + train_args(plan, "fsdp", ["backend.name=fsdp"]),
        "zero3_ws1": launcher(1) + train_args(plan, "zero3", ["backend.name=deepspeed"]),
        "int8": dt + train_args(plan, "int8", ["backend.name=none", "quantization.bits=8"]),
        "nf4": dt + train_args(plan, "nf4", ["backend.name=none", "quantization.bits=4"]),
        "memory": dt + memory,
        "bench": bench,
    }


def numbers_of(name: str, plan: Plan) -> dict:
    """What a finished check measured: losses, step time, peak memory (from its run directory)."""
    run = {
        "smollm2_bf16": "smollm2",
        "llama1b_bf16": "llama1b",
        "fsdp_ws1": "fsdp",
        "zero3_ws1": "zero3",
        "int8": "int8",
        "nf4": "nf4",
    }.get(name)
    if run is None:
        report = plan.out / "memory" / "memory_report.json"
        return {"memory_report": str(report)} if name == "memory" and report.is_file() else {}
    path = plan.out / "runs" / run / "metrics.jsonl"
    if not path.is_file():
        raise OSError(f"no {path}")
    rows = common.read_jsonl(path)
    steps = [r for r in rows if "loss" in r]
    times = sorted(r["step_time_s"] for r in steps[1:] or steps)
    return {
        "losses": [r["loss"] for r in steps],
        "median_step_s": times[len(times) // 2],
        "tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2],
        "memory_last": steps[-1].get("memory"),
    }


def run_check(name: str, cmd: list[str], plan: Plan) -> Result:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if plan.dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    log = plan.out / f"{name}.log"
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=plan.timeout_s)
        ok, error = proc.returncode == 0, "" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        ok, error = False, f"timeout after {plan.timeout_s} s"
    result = Result(name, ok, round(time.perf_counter() - start, 1), cmd, error=error)
    if ok:
        try:
            result.numbers = numbers_of(name, plan)
        except (OSError, ValueError, KeyError) as e:
            result.ok, result.error = False, f"no numbers: {e}"
    if not ok:
        result.error += " | " + common.log_tail(log, 3)[-600:]
    return result


def summary(results: list[Result], plan: Plan) -> str:
    lines = [
        f"# GPU check ({'dry run on CPU' if plan.dry_run else 'CUDA'}), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"machine: {platform.node()}, {common.cuda_device_name()}",
        "",
        "| check | ok | s | median step s | tokens/s | first -> last loss |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        n, status = r.numbers, "yes" if r.ok else "NO: " + r.error[:80].replace("|", "/")
        step = f"{n['median_step_s']:.4g}" if "median_step_s" in n else ""
        tok = f"{n['tokens_per_s']:.0f}" if "tokens_per_s" in n else ""
        loss = f"{n['losses'][0]:.4f} -> {n['losses'][-1]:.4f}" if n.get("losses") else ""
        lines.append(f"| {r.name} | {status} | {r.seconds} | {step} | {tok} | {loss} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for every result and log")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: check the plumbing")
    p.add_argument("--only", help="comma-separated check names")
    args = p.parse_args(argv)
    plan = Plan.make(args.dry_run, args.out)
    plan.out.mkdir(parents=True, exist_ok=True)
    todo = checks(plan)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    results = []
    for name, cmd in todo.items():
        results.append(run_check(name, cmd, plan))
        print(
            f"{name}: {'ok' if results[-1].ok else 'FAILED ' + results[-1].error} ({results[-1].seconds} s)", flush=True
        )
        common.write_json(plan.out / "results.json", [asdict(r) for r in results])
    (plan.out / "summary.md").write_text(summary(results, plan))
    print(summary(results, plan))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
