"""Model-level LoRA operations: wrap a model's linear layers (`inject`), freeze the base, switch,
merge, unmerge and unwrap adapters, the adapter's state dict and its PEFT keys, parameter counts.
The layer itself is dtrain.lora.layer; which layers to adapt is dtrain.lora.targets. Plain torch:
no distributed code here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.lora import variants
from dtrain.lora.layer import AdapterSpec, LoRALinear
from dtrain.model import layers
from dtrain.model.shapes import logical_numel


def check_rank(model: nn.Module, names: list[str], r: int) -> None:
    """lora.r is at most min(in, out) of every targeted layer (a larger rank adds nothing but cost)."""
    for name in names:
        fan_in, fan_out = layers.linear_dims(model.get_submodule(name))
        if r > min(fan_in, fan_out):
            raise ConfigError(
                f"lora.r = {r} is larger than min(in, out) = {min(fan_in, fan_out)} of {name} "
                f"({fan_in} -> {fan_out}); use lora.r <= {min(fan_in, fan_out)} or other targets"
            )


def inject(model: nn.Module, names: list[str], spec: AdapterSpec) -> list[LoRALinear]:
    """Wrap the named linear layers in LoRALinear (if not yet) and add adapter `spec`."""
    check_rank(model, names, spec.r)
    wrapped = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, qualified_name=name)
            setattr(parent, child, module)
        if spec.name in module.lora_A:
            raise ConfigError(f"{name}: adapter '{spec.name}' already exists")
        module.add_adapter(spec)
        wrapped.append(module)
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_kinds() -> tuple[str, ...]:
    """The ModuleDicts that hold adapter parameters: A, B and the variants' state (DoRA's magnitude)."""
    return ("lora_A", "lora_B", *variants.state_kinds())


def is_lora_param(name: str) -> bool:
    """True for the names of adapter parameters: LoRA A/B and the variants' state (one rule, used everywhere)."""
    return any(f".{kind}." in name for kind in adapter_kinds())


def is_loraplus_fast(name: str) -> bool:
    """LoRA+: the parameters trained at lr x lora.loraplus_lr_ratio: B, and the variant state that
    trains with it (DoRA's magnitude, as PEFT's create_loraplus_optimizer groups it)."""
    return any(f".{kind}." in name for kind in ("lora_B", *variants.fast_kinds()))


def is_adapter_param(name: str, adapter: str) -> bool:
    """True for the parameters of adapter `adapter` (`...lora_A.<adapter>.weight`, ...)."""
    return is_lora_param(name) and name.endswith(f".{adapter}.weight")


def freeze_base(model: nn.Module, adapter: str | None = None) -> None:
    """requires_grad only for the adapter parameters (of `adapter`, or of every adapter; not a
    variant's frozen state such as DoRA's `base_norm`)."""
    for name, p in model.named_parameters():
        trainable = (
            is_lora_param(name) and name.endswith(".weight") and (adapter is None or is_adapter_param(name, adapter))
        )
        p.requires_grad_(trainable)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter (task switching). Layers that `name` does not adapt run
    as the plain base layer."""
    layers = list(lora_modules(model))
    if not any(name in m.lora_A for _, m in layers):
        have = sorted({k for _, m in layers for k in m.lora_A})
        raise ConfigError(f"adapter '{name}' not found; have: {', '.join(have) or 'none'}")
    for _, m in layers:
        if m.merged_adapter is not None:
            raise RuntimeError(f"{m.qualified_name}: unmerge before switching adapters")
        m.active_adapter = name if name in m.lora_A else None


def merge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def unwrap(model: nn.Module) -> None:
    """Replace every LoRA layer by its base layer (after merge: exactly the base model's modules)."""
    for name, m in list(lora_modules(model)):
        if name.endswith(".base_layer"):
            continue  # nested in an outer wrapper (expert LoRA on several parameters of one module)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.unwrapped())


def adapter_state_dict(model: nn.Module, adapter: str, peft_keys: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's A and B (and its variant's state: DoRA's magnitude) tensors, keyed as PEFT saves
    them (or as dtrain names them)."""
    out = {}
    for name, m in lora_modules(model):
        for kind in adapter_kinds():
            if adapter not in getattr(m, kind, {}):
                continue
            t = getattr(m, kind)[adapter].weight
            key = (
                to_peft_key(f"{name}.{kind}.{adapter}.weight", adapter)
                if peft_keys
                else f"{name}.{kind}.{adapter}.weight"
            )
            out[key] = t
    return out


def to_peft_key(name: str, adapter: str) -> str:
    """'model.layers.0.q_proj.lora_A.x.weight' -> 'base_model.model.model.layers.0.q_proj.lora_A.weight';
    a variant's state, DoRA's '...lora_magnitude_vector.x.weight' -> '...lora_magnitude_vector' (PEFT
    saves such a parameter without '.weight')."""
    name = "base_model.model." + name.replace(f".{adapter}.weight", ".weight")
    bare = any(name.endswith(f".{kind}.weight") for kind in variants.state_kinds())
    return name.removesuffix(".weight") if bare else name


def from_peft_key(key: str, adapter: str) -> str:
    """Inverse of to_peft_key (a variant state's key with '.weight' is read as well)."""
    name = key.removeprefix("base_model.model.")
    if any(name.endswith(f".{kind}") for kind in variants.state_kinds()):
        name += ".weight"
    for kind in adapter_kinds():
        name = name.replace(f".{kind}.weight", f".{kind}.{adapter}.weight")
    return name


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: logical sizes, so a sharded or quantized weight
    counts as its [out, in] elements."""
    trainable = total = 0
    seen: set[int] = set()  # a tied parameter (lm_head = embed_tokens) belongs to two modules: count it once
    for module in model.modules():
        if layers.is_quantized(module):  # quantized storage: count the weight it encodes
            total += module.in_features * module.out_features
            total += logical_numel(module.bias) if getattr(module, "bias", None) is not None else 0
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = logical_numel(p)
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total
