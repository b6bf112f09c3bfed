"""The DeepSpeed config dtrain generates from its own YAML, and the merge of a user's JSON over it.

`generate(cfg, world_size, size)` turns the YAML's training keys into DeepSpeed's (ZeRO stage 3,
AdamW, clipping, micro batch, accumulation) and sizes ZeRO-3's gather limits from the model
(`size`, see `gather_limits`). `build(cfg, world_size, size)` deep-merges the JSON file named by
`backend.deepspeed_config` over it: keys dtrain does not set pass through unchanged (offload,
bucket sizes, logging...), keys dtrain sets only as a default (the `zero_optimization` tuning
below and the gather limits) may be changed, and a key whose value comes from the YAML (or that
the backend depends on) must agree: a different value is a `ConfigError` naming the file, the key path, both values and
the YAML key to change instead.

No `scheduler` is generated: dtrain's warmup + cosine (`optim.lr_factor`) is handed to
`deepspeed.initialize` as the client `lr_scheduler` (see backends/deepspeed.py for why).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dtrain.backends.zero3_sizing import ModelSize, gather_limits  # noqa: F401  (ds_config.ModelSize: the backend's name for it)
from dtrain.config.schema import Config
from dtrain.errors import ConfigError

# Tuning defaults for the ZeRO-3 partitioning (a user JSON may override any of them).
ZERO_DEFAULTS: dict[str, Any] = {
    # 0: every parameter is partitioned, however small, so each rank holds exactly 1/N of the frozen
    # base. DeepSpeed's default (1e5 elements) keeps small parameters whole on every rank: a small
    # model (norms, LoRA A/B, even whole projections of a tiny model) would not be sharded at all.
    # Keeping the LoRA and norm tensors whole was worth ~1% of a step in the CPU benchmark.
    "stage3_param_persistence_threshold": 0,
    # Elements of the gradient bucket ZeRO-3 allocates up front in the gradient dtype (fp32 here):
    # DeepSpeed's default 5e8 is 2 GB per rank, for LoRA gradients that are a few MB. 5e6 = 20 MB.
    "reduce_bucket_size": 5_000_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
    # zero.Init replaces torch.nn.functional.linear (process-wide, for good) by DeepSpeed's
    # LinearFunctionForZeroStage3, which saves the weight Parameter itself for backward. Plain
    # F.linear saves the view `weight.t()`, which keeps each gathered frozen weight alive until
    # backward whatever the limits below say (measured: +650 MB per rank on a 162M-parameter fp32
    # model, i.e. no saving at all over one process).
    "memory_efficient_linear": True,
}


def generate(cfg: Config, world_size: int | None = None, size: ModelSize | None = None) -> dict[str, Any]:
    """The DeepSpeed config equivalent to `cfg` (before any user JSON); `size` sizes the gathers."""
    t = cfg.training
    bf16 = cfg.model.dtype == "bf16"
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # bf16.enabled makes zero.Init build the frozen base in bf16 (zero.Init takes its dtype
        # from here). The LoRA parameters, their gradients and AdamW states stay fp32 whatever the
        # base dtype (as in the single-process backend): reduce and accumulate gradients in fp32,
        # not in the bf16 that DeepSpeed's bf16 mode would otherwise choose.
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        # The trainer owns the accumulation boundary: backward() only accumulates and every
        # engine.step() is an optimizer step (deepspeed 0.19, as pinned in pyproject.toml).
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": 3, **ZERO_DEFAULTS, **gather_limits(size, world_size)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # torch.optim.AdamW: no fused-kernel compile, same update as the single backend.
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # dtrain logs its own metrics
        "wall_clock_breakdown": False,
    }
    if world_size is not None:
        out["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    return out


def _owners(cfg: Config) -> dict[tuple[str, ...], str]:
    """Key paths whose value dtrain fixes, and the YAML key (or reason) a user should change."""
    return {
        ("train_micro_batch_size_per_gpu",): f"training.micro_batch_size = {cfg.training.micro_batch_size}",
        ("gradient_accumulation_steps",): f"training.grad_accum = {cfg.training.grad_accum}",
        ("train_batch_size",): ("training.micro_batch_size x training.grad_accum x ranks = {value}"),
        ("gradient_clipping",): f"training.max_grad_norm = {cfg.training.max_grad_norm}",
        ("bf16", "enabled"): f"model.dtype = {cfg.model.dtype}",
        ("fp16", "enabled"): f"model.dtype = {cfg.model.dtype} (dtrain has no fp16 mode)",
        ("communication_data_type",): "backend.name = deepspeed (LoRA gradients are reduced in fp32)",
        ("data_types", "grad_accum_dtype"): "backend.name = deepspeed (LoRA gradients are accumulated in fp32)",
        ("managed_gradient_accumulation",): "backend.name = deepspeed (the trainer owns the accumulation boundary)",
        ("zero_optimization", "stage"): "backend.name = deepspeed (dtrain's DeepSpeed backend is ZeRO stage 3)",
        ("optimizer", "type"): "training (dtrain trains with AdamW)",
        ("optimizer", "params", "lr"): f"training.lr = {cfg.training.lr}",
        ("optimizer", "params", "betas"): f"training.betas = {list(cfg.training.betas)}",
        ("optimizer", "params", "eps"): f"training.eps = {cfg.training.eps}",
        ("optimizer", "params", "weight_decay"): f"training.weight_decay = {cfg.training.weight_decay}",
    }


def merge(generated: dict[str, Any], user: dict[str, Any], source: str, cfg: Config) -> dict[str, Any]:
    """`user` deep-merged over `generated`; a conflicting value for a dtrain-owned key is an error."""
    owners = _owners(cfg)
    if "scheduler" in user:
        raise ConfigError(
            f"{source}: scheduler conflicts with training.warmup_steps / training.min_lr_ratio "
            "(dtrain schedules the learning rate itself; remove 'scheduler' from the JSON)"
        )
    if "optimizer" in user and not isinstance(user["optimizer"], dict):
        raise ConfigError(f"{source}: optimizer: expected a mapping")
    user = dict(user)
    if "bfloat16" in user:  # DeepSpeed's alias of "bf16"
        user["bf16"] = user.pop("bfloat16")
    out = copy.deepcopy(generated)
    _merge_into(out, user, (), source, owners)
    return out


def _merge_into(dst: dict, src: dict, path: tuple[str, ...], source: str, owners: dict[tuple[str, ...], str]) -> None:
    for key, value in src.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, here, source, owners)
            continue
        if here in owners and key in dst and not _same(dst[key], value):
            mine = dst[key]
            owner = owners[here].replace("{value}", _fmt(mine))
            raise ConfigError(f"{source}: {'.'.join(here)} = {_fmt(value)} conflicts with {owner}")
        dst[key] = copy.deepcopy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def load_user(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON, as a mapping; a clear error when it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"backend.deepspeed_config = '{path}': file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p.name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p.name}: top level must be a JSON object")
    return data


def build(cfg: Config, world_size: int | None = None, size: ModelSize | None = None) -> dict[str, Any]:
    """The config handed to zero.Init and deepspeed.initialize: generated, then the user's JSON."""
    generated = generate(cfg, world_size, size)
    path = cfg.backend.deepspeed_config
    if path is None:
        return generated
    return merge(generated, load_user(path), Path(path).name, cfg)
