"""`dtrain estimate`: resolve --model, build the plan, print the estimate as a table or JSON.

Wire-up: ``add_estimate_parser(subparsers)`` registers the ``estimate`` sub-command and sets
``func=run_estimate``. Every user error raises ``ConfigError`` with one line; the CLI prints it
and exits 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError
from dtrain.memory.estimate import (
    ATTENTION,
    BACKENDS,
    CATEGORIES,
    DTYPE_BYTES,
    GIB,
    Estimate,
    Plan,
    estimate,
    parse_targets,
)
from dtrain.memory.model_source import (  # noqa: F401  (estimate_cli.resolve_model etc. for their users)
    load_yaml_model_config,
    read_config_json,
    resolve_model,
    shipped_model,
)
from dtrain.memory.model_spec import PRESETS, spec_from_config
from dtrain.memory.paper import paper_comparison_markdown, paper_gpt3_comparison

_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_params": "trainable parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "gathered_unit": "gathered unit (transient)",
    "activations": "activations",
    "loss_logits": "loss logits (transient)",
    "model_states": "model states (sharded)",
    "total": "total per GPU",
}


def add_estimate_parser(subparsers: Any) -> None:
    """Register ``estimate`` on an argparse sub-parsers object; sets ``func=run_estimate``."""
    p = subparsers.add_parser(
        "estimate",
        help="per-GPU memory for full fine-tuning vs LoRA, without loading the model",
        description="Per-GPU memory by category (frozen weights, trainable parameters, "
        "gradients, optimizer state, gathered unit, activations, loss logits) for full "
        "fine-tuning and for LoRA. Sizes in GiB (2^30 B); --json gives bytes. Given a "
        "YAML config, the whole plan is read from it (flags override) and the values "
        "it does not set are listed as assumed.",
    )
    p.add_argument("config", nargs="?", help="a dtrain YAML config (the plan and the model)")
    add_plan_flags(p)
    p.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="dpo: --batch counts preference pairs (2 rows each); full DPO adds its reference copy",
    )
    p.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")
    p.add_argument("--paper", action="store_true", help="print the GPT-3 175B comparison with the LoRA paper and exit")
    p.set_defaults(func=run_estimate)


def add_plan_flags(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    """The plan's flags (shared with `dtrain plan`); every default is None so that a flag given
    can be told from one left to the config (or to the Plan's defaults)."""
    p.add_argument(
        "--model",
        help=f"preset ({', '.join(PRESETS)}), a name under configs/models "
        "(Llama-3.1-70B), a model directory with config.json, a "
        "config.json, or a dtrain YAML config",
    )
    p.add_argument("--gpus", help="GPUs per node")
    p.add_argument("--nodes", help="nodes (default 1); N = gpus * nodes")
    p.add_argument("--backend", choices=BACKENDS, help="default fsdp")
    p.add_argument("--bits", help="LoRA frozen weights: 16 (param dtype), 8, 4")
    p.add_argument("--rank", help="LoRA rank r (default 8)")
    p.add_argument(
        "--targets",
        help="comma-separated module-name suffixes, all-linear, or a "
        "preset: attention-qv, attention, mlp (default q_proj,v_proj)",
    )
    p.add_argument("--batch", help="micro-batch per GPU (default 1)")
    p.add_argument("--seq-len", help="tokens per sequence (default 2048)")
    p.add_argument(
        "--grad-checkpointing",
        nargs="?",
        const="true",
        choices=("true", "false", "attention"),
        help="recompute activations: whole blocks (no value, or true) or attention only",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPE_BYTES),
        help="parameter / compute dtype (default bf16; mixed precision unless fp32)",
    )
    p.add_argument(
        "--fp32-grads",
        action="store_true",
        default=None,
        help="keep gradients in fp32 (DeepSpeed grad_accum_dtype fp32)",
    )
    p.add_argument("--attention", choices=ATTENTION, help="sdpa/flash (no s^2 scores saved, default) or eager")
    p.add_argument(
        "--chunked-loss",
        choices=("auto", "true", "false"),
        help="loss in chunks from the hidden states (default auto: on for LoRA)",
    )
    p.add_argument(
        "--loss-chunk",
        help="tokens per loss chunk (default: training.loss_chunk_tokens's; 0: sized from the vocabulary)",
    )


_INT_FLAGS = {
    "gpus": "--gpus",
    "nodes": "--nodes",
    "bits": "--bits",
    "rank": "--rank",
    "batch": "--batch",
    "seq_len": "--seq-len",
}
_WORDS = {"true": True, "false": False}


def plan_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Plan fields set by flags (numbers parsed here, so bad ones are one-line errors)."""
    out: dict[str, Any] = {
        f: _positive_int(flag, getattr(args, f)) for f, flag in _INT_FLAGS.items() if getattr(args, f, None) is not None
    }
    if args.loss_chunk is not None:
        out["loss_chunk"] = _positive_int("--loss-chunk", args.loss_chunk, minimum=0)
    if args.targets is not None:
        out["targets"] = parse_targets(args.targets)
    for flag, name in (
        ("backend", "backend"),
        ("dtype", "param_dtype"),
        ("attention", "attention"),
        ("fp32_grads", "fp32_grads"),
    ):
        if getattr(args, flag) is not None:
            out[name] = getattr(args, flag)
    for flag, name in (("grad_checkpointing", "grad_checkpointing"), ("chunked_loss", "chunked_loss")):
        value = getattr(args, flag)
        if value is not None:
            out[name] = _WORDS.get(value, value)
    return out


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Plan from flags alone (no YAML config); --gpus is required."""
    if args.gpus is None:
        raise ConfigError("estimate: --gpus is required (GPUs per node)")
    return Plan(**plan_overrides(args))


def run_estimate(args: argparse.Namespace) -> int:
    """Print the estimate (or the paper comparison); return 0. Raises ConfigError on bad input."""
    if args.paper:
        result = paper_gpt3_comparison()
        print(json.dumps(result, indent=2) if args.json else paper_comparison_markdown(result))
        return 0
    config = args.config or (args.model if args.model and Path(args.model).suffix in (".yaml", ".yml") else None)
    if config is None and not args.model:
        raise ConfigError(
            "estimate: --model is required (a preset, model directory or config.json) "
            "unless a YAML config is given; or use --paper"
        )
    assumed: list[str] = []
    if config is not None:
        from dtrain.memory.plan_config import read_plan

        read = read_plan(_yaml_path(config), plan_overrides(args))
        plan, assumed = read.plan, read.assumed
        name, cfg = resolve_model(args.model if args.model and args.model != config else config)
    else:
        plan = plan_from_args(args)
        name, cfg = resolve_model(args.model)
    dpo = getattr(args, "objective", "sft") == "dpo"
    if dpo:
        from dtrain.memory.estimate_dpo import estimate_dpo

        est = estimate_dpo(spec_from_config(cfg, name), plan)
    else:
        est = estimate(spec_from_config(cfg, name), plan)
    extra = {"objective": "dpo", "pairs_per_gpu": plan.batch} if dpo else {}
    if args.json:
        print(json.dumps({**est.to_dict(), "assumed": assumed, **extra}, indent=2))
    else:
        note = "\n" + DPO_NOTE.format(plan.batch) if dpo else ""
        print(format_table(est) + "".join(f"\nassumed: {a}" for a in assumed) + note)
    return 0


def _yaml_path(arg: str) -> Path:
    path = Path(arg)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"estimate: {arg!r} is not a YAML config (.yaml); a model goes in --model")
    if not path.is_file():
        raise ConfigError(f"estimate: config file not found: {arg}")
    return path


def _positive_int(flag: str, text: Any, minimum: int = 1) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"estimate: {flag} must be a positive integer, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"estimate: {flag} must be a positive integer, got {text!r}")
    return value


# ----------------------------------------------------------------------------- output


def _ckpt(p: Plan) -> str:
    if p.grad_checkpointing in (False, "off"):
        return "off"
    every = f" every {p.checkpoint_every} blocks" if p.checkpoint_every > 1 else ""
    return ("attention" if p.grad_checkpointing == "attention" else "on") + every


def format_table(est: Estimate) -> str:
    """Human-readable report: header lines, then per-GPU GiB by category, then cluster."""
    s, p = est.spec, est.plan
    source = "exact, meta-device build" if s.source == "meta" else "Llama-style arithmetic"
    lines = [
        f"{s.name}: {s.total_params:,} parameters ({source}), {s.num_layers} layers, "
        f"hidden {s.hidden_size}, vocab {s.vocab_size}",
        *(
            [
                f"mixture of experts: {s.expert_params:,} parameters in expert weights, {s.active_params:,} "
                f"active per token"
            ]
            if s.expert_params
            else []
        ),
        f"plan: {p.world_size} GPUs ({p.nodes} node(s) x {p.gpus}), {p.backend}, "
        f"{p.param_dtype}{' + fp32 grads' if p.fp32_grads else ''}, micro-batch {p.batch} x "
        f"{p.seq_len} tokens, grad checkpointing {_ckpt(p)}, attention {p.attention}, "
        f"chunked loss {p.chunked_loss}",
        f"LoRA: r={p.rank} on {','.join(p.targets + p.target_parameters)}: {est.lora_params:,} trainable "
        f"({est.lora_params / s.total_params:.3%}), frozen weights {p.bits}-bit",
        "",
        f"{'per GPU (GiB)':<28}{'full FT':>12}{'LoRA':>12}{'full/LoRA':>11}",
    ]
    ratios = est.category_ratios()
    for key in CATEGORIES + ("model_states", "total"):
        full, lora, ratio = getattr(est.full, key), getattr(est.lora, key), ratios[key]
        shown = f"{ratio:.1f}x" if ratio else "-"
        lines.append(f"{_LABELS[key]:<28}{full / GIB:>12.2f}{lora / GIB:>12.2f}{shown:>11}")
    n = p.world_size
    lines.append(
        f"{f'cluster total (x {n})':<28}{est.cluster('full').total / GIB:>12.2f}"
        f"{est.cluster('lora').total / GIB:>12.2f}{est.ratio:>10.1f}x"
    )
    return "\n".join(lines)


DPO_NOTE = (
    "objective dpo: {0} pair(s) per GPU = the micro-batch of rows above; LoRA's reference is the base "
    "with the adapter off (0 B more), full DPO's frozen weights are its reference copy of the model"
)
