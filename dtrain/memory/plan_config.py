"""One mapping between a dtrain YAML config and the estimator's ``Plan``, both ways: what
`dtrain estimate CONFIG`, `dtrain plan`, the memory report and the fake-group simulation read from
a config, and what `dtrain plan --write` writes back.

A config is read whole (every key the estimate depends on) but not validated as a training run:
an estimate needs neither the data files nor the model's weights. Values the YAML does not set
are training's defaults, and are listed as assumed; the GPUs come from the flags, else from the
config's first-line launch command (as the recipes write it), else 1 (assumed too).
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.config.schema import Config
from dtrain.errors import ConfigError
from dtrain.memory.estimate import Plan

# Plan field -> (config section, key) it is read from.
KEYS = {
    "backend": ("backend", "name"),
    "bits": ("quantization", "bits"),
    "rank": ("lora", "r"),
    "targets": ("lora", "targets"),
    "batch": ("training", "micro_batch_size"),
    "seq_len": ("data", "seq_len"),
    "grad_checkpointing": ("model", "gradient_checkpointing"),
    "checkpoint_every": ("model", "gradient_checkpointing_every"),
    "param_dtype": ("model", "dtype"),
    "chunked_loss": ("training", "chunked_loss"),
    "loss_chunk": ("training", "loss_chunk_tokens"),
}


@dataclass
class ConfigPlan:
    """A plan read from a config: the plan, the values assumed (not in the YAML), the raw YAML."""

    plan: Plan
    assumed: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


def typed(raw: dict, source: str) -> Config:
    """The YAML's values type-checked by the schema (unknown keys, wrong types and ranges are the
    usual one-line errors) without the cross-field checks that need files on disk."""
    from dtrain.config import schema as config_lib

    raw = copy.deepcopy(raw)
    (raw.get("model") or {}).pop("path", None)  # the architecture is resolved by the caller
    return config_lib.from_dict(raw, source)


def resolved_config(path: Path) -> Config:
    """A YAML config typed by the schema, its model as an inline architecture (``model.arch``:
    the shipped config.json of a recipe's ``model.path``), for the fake-group simulation."""
    from dtrain.config.schema import read_yaml
    from dtrain.memory.model_source import load_yaml_model_config

    cfg = typed(read_yaml(path), str(path))
    arch = {k: v for k, v in load_yaml_model_config(path).items() if k != "torch_dtype"}
    cfg.model.arch, cfg.model.path = arch, None
    return cfg


def plan_fields(cfg: Config) -> dict[str, Any]:
    """The Plan fields a typed config sets (see KEYS), plus the derived ones."""
    values = {f: getattr(getattr(cfg, s), k) for f, (s, k) in KEYS.items()}
    if values["backend"] not in ("fsdp", "deepspeed"):
        values["backend"] = "fsdp"  # one process: nothing is sharded, N = 1 cuts nothing
    targets = values["targets"]
    values["targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
    values["target_parameters"] = tuple(cfg.lora.target_parameters or ())  # not a flag: the config's only
    values["fp32_grads"] = cfg.backend.name == "deepspeed"  # ds_config: grad_accum_dtype fp32
    arch = cfg.model.arch or {}
    values["attention"] = "eager" if arch.get("attn_implementation") == "eager" else "sdpa"
    return values


def plan_from_config(cfg: Config, gpus: int = 1, nodes: int = 1) -> Plan:
    """The estimator's plan of a loaded config on ``gpus`` x ``nodes`` ranks."""
    return Plan(gpus=gpus, nodes=nodes, **plan_fields(cfg))


def read_plan(path: Path, overrides: dict[str, Any]) -> ConfigPlan:
    """The plan of a YAML config, ``overrides`` (Plan fields from flags) applied last; the
    values taken from defaults (neither in the YAML nor overridden) are listed as assumed."""
    from dtrain.config.schema import read_yaml

    raw = read_yaml(path)
    values = plan_fields(typed(raw, str(path)))
    assumed = [
        f"{f} = {_show(values[f])} ({s}.{k} not set)"
        for f, (s, k) in KEYS.items()
        if f not in overrides and k not in (raw.get(s) or {})
    ]
    text = path.read_text(encoding="utf-8").splitlines()
    first = text[0][1:].strip() if text and text[0].startswith("#") else ""
    gpus, nodes = launch_shape(first) if first.split()[:1] in (["torchrun"], ["deepspeed"]) else (None, None)
    if "gpus" not in overrides:
        if gpus is None:
            assumed.insert(0, "gpus = 1 (no --gpus, no launch command on the config's first line)")
        values["gpus"] = gpus or 1
    if "nodes" not in overrides:
        values["nodes"] = nodes or 1
    values.update(overrides)
    if "fp32_grads" not in overrides:  # derived from the backend, which a flag may have changed
        values["fp32_grads"] = values["backend"] == "deepspeed"
    try:
        return ConfigPlan(Plan(**values), assumed, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def launch_shape(command: str) -> tuple[int, int]:
    """(processes per node, nodes) of a torchrun / deepspeed / python command line."""
    words = shlex.split(command)

    def flag(*names: str) -> int | None:
        for i, w in enumerate(words):
            for n in names:
                if w == n and i + 1 < len(words):
                    return int(words[i + 1])
                if w.startswith(n + "="):
                    return int(w.split("=", 1)[1])
        return None

    return flag("--nproc_per_node", "--nproc-per-node", "--num_gpus") or 1, flag("--nnodes", "--num_nodes") or 1


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_dict(plan: Plan, model: dict[str, Any], base: dict | None = None) -> dict[str, Any]:
    """A dtrain YAML mapping that trains ``plan``: ``base`` (a config's raw mapping) with the
    plan's keys set; ``model`` is the model section's source (``{"path": ...}`` or ``{"arch": ...}``)."""
    out = copy.deepcopy(base or {})
    out.setdefault("model", {})
    out["model"].pop("path", None)
    out["model"].pop("arch", None)
    out["model"].update(model)
    values = {f: getattr(plan, f) for f in KEYS}
    values["targets"] = values["targets"][0] if len(plan.targets) == 1 else list(plan.targets)
    for f, (section, key) in KEYS.items():
        out.setdefault(section, {})[key] = values[f]
    return out
