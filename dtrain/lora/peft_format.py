"""Adapters in PEFT's format: what PEFT's `save_pretrained` writes, and what it loads.

Nothing of the frozen base is ever written: only the LoRA A and B tensors, gathered by
`backend.full_state` with a LoRA-only filter (so ZeRO-3 gathers and FSDP2 unshards only those).
An adapter directory (`<output.dir>/adapter/`, and `adapter/` inside each training checkpoint,
see checkpoint.py) holds:

    adapter_config.json        PEFT LoraConfig
    adapter_model.safetensors  LoRA A and B (full tensors, PEFT keys: `base_model.model.<module>.lora_A.weight`),
                               and DoRA's magnitude (`<module>.lora_magnitude_vector`, no `.weight`, as PEFT)

and the final adapter of a run also the chat template and stop tokens it trained with
(`chat_template.jinja`, `generation_config.json`: dtrain/model/templates.py, read by generation),
so `peft.PeftModel.from_pretrained(base, dir)` loads it, and `load_adapter` loads PEFT's adapters.
`save_adapter` publishes the directory atomically with a checksummed COMPLETE marker (files.publish).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from dtrain.backends import collectives
from dtrain.config.schema import Config
from dtrain.errors import DtrainError
from dtrain.lora import experts, ops, variants
from dtrain.lora.layer import AdapterSpec, LoRALinear
from dtrain.lora.targets import linear_names
from dtrain.model import layers, templates
from dtrain.storage import files

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def gather_adapter(backend, adapter: str) -> dict[str, torch.Tensor]:
    """Full CPU tensors of adapter `adapter`'s A and B (and its variant's state, DoRA's magnitude)
    only, by dtrain name (collective)."""
    return backend.full_state(lambda n: ops.is_adapter_param(n, adapter))


def target_modules(model: nn.Module, modules: list[str]) -> list[str] | str:
    """PEFT's `target_modules` for exactly `modules`: name suffixes when they select exactly these
    modules in `model`, else a regex that PEFT full-matches against module names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    same_suffix = {n for n in linear_names(model) if n.rsplit(".", 1)[-1] in suffixes}
    if same_suffix == set(modules):
        return suffixes
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def peft_config(
    cfg: Config,
    targets: list[str] | str,
    base_name: str | None,
    fan_in_fan_out: bool = False,
    target_parameters: list[str] | None = None,
) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter (`fan_in_fan_out`: the targets are
    Conv1D layers, weights stored [in, out], as PEFT sets it for GPT-2; `target_parameters`: fused
    expert weights, PEFT 0.21's field, `targets` then [] when no linear layer is adapted). A Hub
    model is named by its ID, with its commit as PEFT's `revision`."""
    from dtrain.model import hub

    shown = hub.display(base_name)
    name, _, revision = shown.partition("@") if hub.commit_of(base_name) else (base_name, "", None)
    return {
        "target_parameters": target_parameters or None,
        "revision": revision,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": name,
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": bool(cfg.lora.use_rslora),
        **{cls.flag: bool(getattr(cfg.lora, cls.flag)) for cls in variants.classes()},  # use_dora
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def write_adapter(model: nn.Module, cfg: Config, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write gathered A/B tensors (dtrain names) into directory `out` in PEFT's format (one rank)."""
    name = cfg.lora.adapter_name
    peft = {ops.to_peft_key(k, name): t for k, t in tensors.items()}
    files.write_tensors(out / ADAPTER_WEIGHTS, peft, {"format": "pt"})
    wrappers = experts.layer_names(model)
    modules = sorted({k.split(".lora_")[0] for k in tensors} - wrappers)
    params = experts.peft_target_parameters(model, experts.adapted_parameters(model, name), cfg.lora.target_parameters)
    targets = target_modules(model, modules) if modules else []
    fan_in_fan_out = any(getattr(model.get_submodule(m), "fan_in_fan_out", False) for m in modules)
    files.write_json(
        out / ADAPTER_CONFIG, peft_config(cfg, targets, cfg.model.path, fan_in_fan_out, target_parameters=params)
    )


def save_adapter(
    backend,
    cfg: Config,
    out: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    chat: tuple[str | None, list[int]] | None = None,
) -> None:
    """Gather only the LoRA tensors of the adapter being trained (unless `tensors` are the ones
    already gathered); rank 0 writes `out` atomically, with `chat` (template, stop ids) when given."""
    tensors = gather_adapter(backend, cfg.lora.adapter_name) if tensors is None else tensors
    if not tensors:
        if backend.rank == 0:
            log.warning(
                "no LoRA parameters for adapter '%s' (mode %s): no adapter written", cfg.lora.adapter_name, cfg.mode
            )
        backend.barrier()
        return

    def write() -> None:
        tmp = files.staging_dir(out)
        files.fresh_dir(tmp)
        write_adapter(backend.model, cfg, tensors, tmp)
        if chat is not None:
            templates.write_settings(tmp, *chat)
        files.publish(tmp, out, {"kind": "adapter"})

    collectives.together(backend, write, what="adapter write")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by PEFT key) of a PEFT LoRA adapter directory."""
    d = Path(directory)
    if not d.is_dir():
        raise DtrainError(f"adapter directory '{d}' not found")
    for f in ADAPTER_FILES:
        if not (d / f).is_file():
            raise DtrainError(
                f"adapter directory '{d}': no {f} (a PEFT LoRA adapter has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            )
    if (d / files.MARKER).is_file():  # written by dtrain: its checksums must match
        reason = files.verify(d, lambda info: list(ADAPTER_FILES))
        if reason is not None:
            raise DtrainError(f"adapter directory '{d}': {reason}")
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DtrainError(f"{d / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DtrainError(f"{d / ADAPTER_CONFIG}: not a JSON object (a PEFT LoraConfig)")
    return config, files.read_tensors(d / ADAPTER_WEIGHTS)


# fan_in_fan_out is not here: dtrain's layer reads each base layer's storage (Conv1D or Linear) as
# PEFT's does, which corrects the flag per layer.
_UNSUPPORTED = (
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
)


def adapter_spec_from_peft(config: dict, name: str, source: str | Path) -> AdapterSpec:
    """The AdapterSpec of a PEFT LoraConfig dict; a clear error for what dtrain does not support."""
    if config.get("peft_type", "LORA") != "LORA":
        raise DtrainError(f"{source}: peft_type {config.get('peft_type')!r} is not LoRA")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']}")
    if used:
        raise DtrainError(f"{source}: PEFT option(s) {', '.join(used)} not supported by dtrain's LoRA layer")
    r, alpha = _number(config, "r", int, source), _number(config, "lora_alpha", float, source)
    flags = {cls.flag: bool(config.get(cls.flag)) for cls in variants.classes()}  # use_dora
    return AdapterSpec(
        name=name,
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora")),
        **flags,
    )


def _number(config: dict, key: str, kind: type, source: str | Path) -> int | float:
    """A positive number of adapter_config.json (r: an integer), or one line naming the key."""
    value = config.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        what = "missing" if value is None else f"{value!r}"
        need = "a positive integer" if kind is int else "a positive number"
        raise DtrainError(f"{Path(source) / ADAPTER_CONFIG}: '{key}' is {what}; needs {need}")
    return kind(value)


def check_rank(
    modules: dict[str, dict[str, torch.Tensor]], r: int, source: str | Path, num_experts: dict[str, int] | None = None
) -> None:
    """Every A is (r, in) and every B (out, r), with the config's r; an expert parameter's
    (modules in `num_experts`) are (r * E, in) and (out, r * E), PEFT's ParamWrapper layout."""
    for name, ab in sorted(modules.items()):
        a, b = ab["lora_A"].shape, ab["lora_B"].shape
        rank = r * (num_experts or {}).get(name, 1)
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise DtrainError(
                f"{Path(source) / ADAPTER_CONFIG}: 'r' = {r}, but {name}.lora_A has shape {list(a)} "
                f"and lora_B {list(b)} in {ADAPTER_WEIGHTS} (rank {a[0]})"
            )


def adapter_modules(
    tensors: dict[str, torch.Tensor], source: str | Path, spec: AdapterSpec | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A": A, "lora_B": B[, "lora_magnitude_vector": m]}} from PEFT-keyed
    adapter tensors; every module has the state of `spec`'s variant (DoRA: its magnitude), and no
    other variant's (no spec: plain LoRA)."""
    state = variants.state_kinds()  # saved without '.weight', as PEFT saves DoRA's magnitude
    pattern = rf"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|{'|'.join(state)})(\.weight)?"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(pattern, key)
        if m is None or (m.group(3) and m.group(2) not in state):
            raise DtrainError(f"{source}: tensor '{key}' is not a LoRA A/B weight of a linear layer")
        out.setdefault(m.group(1), {})[m.group(2).removesuffix(".weight")] = t
    want = {"lora_A", "lora_B", *(variants.for_spec(spec).state if spec is not None else ())}
    for module, ab in out.items():
        if set(ab) != want:
            extra = sorted(set(ab) - want)
            owner = variants.owner(extra[0]) if extra else None
            what = (
                f"has only {', '.join(sorted(ab))}"
                if set(ab) < want
                else f"has a {owner.title} but {owner.flag} is not set in adapter_config.json"
            )
            raise DtrainError(f"{source}: module '{module}' {what}")
    return out


def _check_shapes(model: nn.Module, modules: dict, spec: AdapterSpec, source: str | Path) -> None:
    variant = variants.for_spec(spec)
    for name, ab in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise DtrainError(f"{source}: the model has no module '{name}' (adapter for another base?)") from None
        if not (layers.is_linear(layer) or isinstance(layer, LoRALinear)):
            raise DtrainError(f"{source}: module '{name}' is a {type(layer).__name__}, not a linear layer")
        fan_in, fan_out = layers.linear_dims(layer)
        r = spec.r * getattr(layer, "num_experts", 1)  # an expert parameter's A is [r * E, in]
        want = {"lora_A": (r, fan_in), "lora_B": (fan_out, r)}
        want.update({kind: variant.saved_shape(kind, fan_in, fan_out) for kind in variant.state})
        for kind, t in ab.items():
            if tuple(t.shape) != want[kind]:
                raise DtrainError(
                    f"{source}: {name}.{kind} has shape {list(t.shape)}, the model needs "
                    f"{list(want[kind])} (adapter for another base?)"
                )


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> AdapterSpec:
    """Add the PEFT LoRA adapter in `directory` to `model` as adapter `name` (dtrain's or PEFT's).

    The model is a materialized plain (unsharded) model; the adapter's modules are wrapped in
    LoRALinear where not yet. The first adapter loaded becomes active; loading another keeps the
    active one (everywhere); `ops.set_adapter` switches (task switching).
    """
    config, tensors = read_adapter(directory)
    spec = adapter_spec_from_peft(config, name, directory)
    modules = adapter_modules(tensors, directory, spec)
    active = next((m.active_adapter for _, m in ops.lora_modules(model) if m.active_adapter), None)
    wrapped = _add_expert_layers(model, config, spec, directory)
    check_rank({n: ab for n, ab in modules.items() if n not in wrapped}, spec.r, directory)
    _check_shapes(model, modules, spec, directory)
    for layer_name in set(modules) - wrapped:
        layer = model.get_submodule(layer_name)
        if isinstance(layer, LoRALinear) and name in layer.lora_A:
            raise DtrainError(f"{directory}: the model already has an adapter named '{name}'")
    if wrapped - set(modules):
        raise DtrainError(
            f"{directory}: target_parameters name {sorted(wrapped - set(modules))[0]}, which "
            f"{ADAPTER_WEIGHTS} has no LoRA tensors for"
        )
    ops.inject(model, sorted(set(modules) - wrapped), spec)
    if active is not None and not any(m.merged_adapter for _, m in ops.lora_modules(model)):
        ops.set_adapter(model, active)  # layers new to this adapter must not switch on their own
    model.train(model.training)  # new LoRA modules (dropout) follow the model's train/eval mode
    with torch.no_grad():
        for layer_name, ab in modules.items():
            layer = model.get_submodule(layer_name)
            for kind, t in ab.items():
                getattr(layer, kind)[name].weight.copy_(t)
    return spec


def _add_expert_layers(model: nn.Module, config: dict, spec: AdapterSpec, source: str | Path) -> set[str]:
    """Wrap the expert parameters named by adapter_config.json's `target_parameters` (PEFT 0.21)
    with adapter `spec`; returns the names of the wrappers holding it."""
    targets = config.get("target_parameters") or []
    if not targets:
        return set()
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise DtrainError(f"{Path(source) / ADAPTER_CONFIG}: 'target_parameters' = {targets!r}: needs a list of names")
    try:
        layers = experts.inject(model, experts.select_parameters(model, targets), spec)
    except DtrainError as e:
        raise DtrainError(f"{Path(source) / ADAPTER_CONFIG}: {e}") from None
    ids = {id(m) for m in layers}
    return {n for n, m in model.named_modules() if id(m) in ids}
