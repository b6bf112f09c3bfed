"""`dtrain plan --model M --gpus G [--nodes N] --gpu-memory 80GB [--seq-len L] [CONFIG]`: the LoRA
configurations that fit, ranked by estimated throughput with their headroom (dtrain/memory/planner.py);
`--write DIR` writes the best one as DIR/plan.yaml, the launch line on its first line; a model that
fits nowhere is one line saying what would (exit 2).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from dtrain.errors import ConfigError
from dtrain.memory import planner
from dtrain.memory.estimate import Plan

GIB = 2**30
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(GB|GiB|G)?\s*", re.I)


def add_parser(subparsers: Any) -> None:
    """Register ``plan`` on an argparse sub-parsers object; sets ``func=run``."""
    from dtrain.cli.estimate import add_plan_flags

    p = subparsers.add_parser(
        "plan",
        help="the LoRA configurations that fit a model on a cluster, fastest first",
        description="Searches backend, frozen-weight bits, micro-batch, gradient checkpointing "
        "and the chunked loss with the memory estimator; lists those that fit "
        f"({planner.HEADROOM:.0%} of --gpu-memory) by estimated tokens/s per GPU.",
    )
    p.add_argument("config", nargs="?", help="a dtrain YAML config: rank, targets, seq_len, dtype, model")
    add_plan_flags(p)
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GB or 24GB (GiB)")
    p.add_argument("--top", type=int, default=10, help="configurations listed (default 10)")
    p.add_argument("--write", metavar="DIR", help="write the best configuration as DIR/plan.yaml")
    p.set_defaults(func=run)


def gpu_memory(text: str) -> float:
    """``80GB`` / ``80GiB`` / ``80`` -> bytes. A card sold as 80 GB holds 80 GiB (2^30 B each)."""
    match = _MEMORY.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"plan: --gpu-memory {text!r}: expected a size such as 80GB or 24GB")
    return float(match.group(1)) * GIB


def base_plan(args: argparse.Namespace) -> tuple[Plan, str, dict, dict]:
    """(plan to vary, model name, HF config, the YAML's raw mapping or {})."""
    from dtrain.cli.estimate import plan_overrides, resolve_model

    overrides = plan_overrides(args)
    if args.gpus is None:
        raise ConfigError("plan: --gpus is required (GPUs per node)")
    if args.config:
        from dtrain.memory.plan_config import read_plan

        read = read_plan(Path(args.config), overrides)
        name, cfg = resolve_model(args.model or args.config)
        return read.plan, name, cfg, read.raw
    if not args.model:
        raise ConfigError(
            "plan: --model is required (a preset, model name, directory or config.json) unless a YAML config is given"
        )
    name, cfg = resolve_model(args.model)
    return Plan(**overrides), name, cfg, {}


def run(args: argparse.Namespace) -> int:
    """Print the fitting configurations (or raise the way out); maybe write the best one."""
    from dtrain.memory.model_spec import spec_from_config

    memory = gpu_memory(args.gpu_memory)
    base, name, hf, raw = base_plan(args)
    spec = spec_from_config(hf, name)
    options = planner.fitting(planner.evaluate(spec, base, memory), memory)
    where = f"{name} on {base.world_size} x {memory / GIB:g} GiB GPUs ({base.nodes} node(s) x {base.gpus})"
    if not options:
        raise ConfigError(f"plan: nothing fits {where}: {planner.way_out(spec, base, memory)}")
    print(
        f"{where}, LoRA r={base.rank} on {','.join(base.targets)}, {base.seq_len} tokens, "
        f"{base.param_dtype}: {len(options)} configurations fit (<= {planner.HEADROOM:.0%} of memory)"
    )
    print(table(options[: max(1, args.top)]))
    if args.write:
        path, line = write(options[0].plan, args, raw)
        print(f"\nwrote {path}\nlaunch: {line}")
    return 0


def table(options: list[planner.Option]) -> str:
    head = (
        f"{'#':>3} {'backend':<10}{'bits':>5}{'batch':>6} {'checkpointing':<14}{'loss':<8}"
        f"{'GiB/GPU':>9}{'headroom':>10}{'tokens/s/GPU':>14}"
    )
    lines = [head]
    for i, o in enumerate(options, 1):
        p = o.plan
        ckpt = {False: "off", True: "blocks", "attention": "attention"}[p.grad_checkpointing]
        lines.append(
            f"{i:>3} {p.backend:<10}{p.bits:>5}{p.batch:>6} {ckpt:<14}"
            f"{'chunked' if p.chunked_loss is True else 'logits':<8}{o.total / GIB:>9.2f}"
            f"{o.headroom / GIB:>9.2f}G{o.tokens_per_s:>14,.0f}"
        )
    return "\n".join(lines)


def launch_line(plan: Plan, config: str) -> str:
    """The command that runs ``config`` on the plan's cluster: torchrun (FSDP2), deepspeed (ZeRO-3),
    or for several nodes also `dtrain slurm` (an sbatch script)."""
    if plan.backend == "deepspeed":
        cmd = f"deepspeed --num_gpus {plan.gpus} --module dtrain train {config}"
        if plan.nodes > 1:
            cmd = f"deepspeed --hostfile hostfile --num_nodes {plan.nodes} --num_gpus {plan.gpus} --module dtrain train {config}"
    elif plan.nodes > 1:
        cmd = (
            f"torchrun --nnodes {plan.nodes} --node_rank <0..{plan.nodes - 1}> --master_addr <node0> "
            f"--master_port 29500 --nproc_per_node {plan.gpus} -m dtrain train {config}"
        )
    else:
        cmd = f"torchrun --nproc_per_node {plan.gpus} -m dtrain train {config}"
    if plan.nodes > 1:
        cmd += f"   # or: dtrain slurm {config} --nodes {plan.nodes} --gpus-per-node {plan.gpus}"
    return cmd


def _model_path(arg: str) -> str:
    """model.path for --model: a directory as given; a shipped architecture's name as the recipes
    write it (models/<name>: where its weights are to be downloaded)."""
    from dtrain.memory.model_source import shipped_model

    shipped = shipped_model(arg)
    return f"models/{shipped.name}" if shipped is not None and not Path(arg).is_dir() else arg


def write(plan: Plan, args: argparse.Namespace, raw: dict) -> tuple[Path, str]:
    """DIR/plan.yaml: the chosen plan over the config's other keys, the launch line first."""
    from dtrain.memory.plan_config import config_dict

    out = Path(args.write)
    path = out / "plan.yaml"
    if path.exists():
        raise ConfigError(f"plan: --write {out}: {path} exists; choose another directory")
    model = dict(raw.get("model") or {})
    source = (
        {"path": model["path"]}
        if "path" in model
        else {"arch": model["arch"]}
        if "arch" in model
        else {"path": _model_path(str(args.model))}
    )
    data = config_dict(plan, source, raw)
    line = launch_line(plan, str(path))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {line}\n# written by dtrain plan: {planner.describe(plan)}\n" + yaml.safe_dump(data, sort_keys=False)
    )
    return path, line
