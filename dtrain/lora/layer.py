r"""LoRA as in Hu et al. (2021): a frozen weight plus a trainable low-rank update.

        x ──────────────┬──────────────► W0 x ──────┐
                        │                           (+) ──► h = W0 x + (alpha / r) B A x
                        └─► dropout ─► A ─► B ─► × (alpha / r)

W0 (the wrapped `base_layer`) is frozen. A (r x in) is random, B (out x r) is zero, so the model's
output is unchanged before the first step. `merge()` folds (alpha / r) B A into W0 (no added
latency at inference); `unmerge()` takes it out again. Several named adapters may sit on one base;
`set_adapter()` switches which one is active. Plain torch: no distributed code in this file.

Variants (docs/lora_variants.md): rsLoRA scales by alpha / sqrt(r) instead of alpha / r
(`AdapterSpec.use_rslora`); DoRA adds a learned magnitude per output row (`use_dora`, dtrain/lora/dora.py);
LoRA+ is an optimizer setting (`is_loraplus_fast`, optim.optimizer_groups).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.lora import dora
from dtrain.model import layers
from dtrain.model.shapes import logical_numel


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters."""

    name: str = "default"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init_seed: int = 0
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters (PEFT's parameter naming)."""

    def __init__(self, base_layer: nn.Module, qualified_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layers.linear_dims(base_layer)
        # The checkpoint stores the weight [in, out] (a Conv1D, quantized or not): PEFT's flag
        self.fan_in_fan_out = layers.is_conv1d(base_layer) or getattr(base_layer, "stored_transposed", False)
        self.qualified_name = qualified_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (PEFT's name)
        self._merged_norm: torch.Tensor | None = None  # DoRA: ||W0 + s B A||_row of the merge
        self.scaling: dict[str, float] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def add_adapter(self, spec: AdapterSpec) -> None:
        """Add an adapter: A from a generator seeded by (seed, module name), B zero.

        A and B are float32 whatever the base's dtype (the trainable part keeps full precision).
        """
        if spec.use_dora and self.fan_in_fan_out:
            raise ConfigError(f"lora.use_dora: {self.qualified_name} is a Conv1D layer (weight stored in x out), "
                              "which dtrain's DoRA does not adapt; use plain LoRA for this model")
        device = next(self.base_layer.parameters()).device  # meta when the model is built empty
        a = dora.AdapterLinear(self.in_features, spec.r, bias=False, device=device)
        b = dora.AdapterLinear(spec.r, self.out_features, bias=False, device=device)
        self.lora_A[spec.name] = a
        self.lora_B[spec.name] = b
        self.specs[spec.name] = spec
        self.scaling[spec.name] = spec.scaling
        if spec.use_dora:
            self.lora_magnitude_vector[spec.name] = dora.Magnitude(self.out_features, device=device)
        if a.weight.device.type != "meta":
            self.reset_adapter(spec.name)
        self.lora_dropout[spec.name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        if self.active_adapter is None:
            self.active_adapter = spec.name

    def reset_adapter(self, name: str) -> None:
        """A from its name-seeded init, B zero (and DoRA's m = ||W0||_row): the adapter's exact
        starting point. DoRA's magnitude is left to the loader where the base weight is not whole."""
        with torch.no_grad():
            self.lora_A[name].weight.copy_(self.initial_value("lora_A", name))
            self.lora_B[name].weight.zero_()
            w0 = dora.whole_base_weight(self.base_layer) if name in self.lora_magnitude_vector else None
            if w0 is not None:
                magnitude = self.lora_magnitude_vector[name]
                magnitude.weight.copy_(dora.row_norms(w0))
                magnitude.base_norm.copy_(magnitude.weight)

    def initial_value(self, kind: str, name: str) -> torch.Tensor:
        """The full initial tensor of `lora_A` or `lora_B` of adapter `name` (DoRA's magnitude
        depends on the base weight: model.ModelSource computes it from the weight source)."""
        spec = self.specs[name]
        if kind == "lora_B":
            return torch.zeros(self.out_features, spec.r)
        return init_lora_A(self.qualified_name, spec, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        a, b = self.lora_A[name], self.lora_B[name]
        x, h = _inputs(x, a.weight.dtype)
        out = self.base_layer(x)
        if name in self.lora_magnitude_vector:
            return dora.forward(h, x, out, self.base_layer, a, b, self.lora_dropout[name],
                                self.lora_magnitude_vector[name], self.scaling[name])
        return out + (b(a(self.lora_dropout[name](h))) * self.scaling[name]).to(out.dtype)

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def delta_weight(self, name: str) -> torch.Tensor:
        """s B A as a full [out, in] float32 tensor (s = alpha / r, or alpha / sqrt(r))."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.float() @ a.float()) * self.scaling[name]

    def stored_delta(self, name: str) -> torch.Tensor:
        """s B A laid out as the base layer holds its weight: [in, out] in a Conv1D (PEFT's fan_in_fan_out)."""
        delta = self.delta_weight(name)
        return delta.t() if layers.is_conv1d(self.base_layer) else delta

    def merge(self) -> None:
        """Fold the active adapter into the base weight. A quantized base is dequantized first:
        the layer then holds a float weight (the merged model has no quantized storage)."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"{self.qualified_name}: adapter '{self.merged_adapter}' is already merged")
        if self.active_adapter is None:
            return  # this layer is not adapted by the active adapter
        if not _has_float_weight(self.base_layer):
            self.base_layer = _dequantized_linear(self.base_layer)
        w = self.base_layer.weight.data
        name = self.active_adapter
        with torch.no_grad():
            if name in self.lora_magnitude_vector:  # DoRA: m / ||W0 + s B A||_row * (W0 + s B A)
                merged, self._merged_norm = dora.merged_weight(
                    w, self.delta_weight(name), self.lora_magnitude_vector[name].weight)
                w.copy_(merged.to(w.dtype))
            else:
                w.add_(self.stored_delta(name).to(w.dtype))
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight again."""
        if self.merged_adapter is None:
            if self.active_adapter is None:
                return
            raise RuntimeError(f"{self.qualified_name}: no adapter is merged")
        w = self.base_layer.weight.data
        name = self.merged_adapter
        with torch.no_grad():
            if name in self.lora_magnitude_vector:
                g = self.lora_magnitude_vector[name].weight.float() / self._merged_norm
                w.copy_((w.float() / g.unsqueeze(1) - self.delta_weight(name)).to(w.dtype))
                self._merged_norm = None
            else:
                w.sub_(self.stored_delta(name).to(w.dtype))
        self.merged_adapter = None


def _inputs(x: torch.Tensor, lora_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the base layer's input, the LoRA path's input). Under autocast both are x cast once to the
    autocast dtype (not by each linear layer again, nor a bf16 x first up to the float32 LoRA dtype
    and back down), so A saves that one cast for backward; else x and x in the LoRA weights' dtype
    (the same tensor when the dtypes agree: the frozen base saves no input, A saves x itself)."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))
        return x, x
    return x, x.to(lora_dtype)


def _has_float_weight(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and w.is_floating_point()


def _dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A float32 nn.Linear holding a quantized layer's dequantized weight (and its bias)."""
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantized_weight())
        if bias is not None:
            linear.bias.copy_(bias.float())
    linear.requires_grad_(False)
    return linear


def init_lora_A(qualified_name: str, spec: AdapterSpec, in_features: int) -> torch.Tensor:
    """A's initial value: Kaiming-uniform (as nn.Linear) from a name-seeded generator.

    Every rank and every backend computes the same tensor without communicating.
    """
    seed = zlib.crc32(f"{spec.init_seed}:{spec.name}:{qualified_name}".encode())
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
    return (torch.rand(spec.r, in_features, generator=g) * 2 - 1) * bound


# ---- model-level helpers -------------------------------------------------------------------

def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers a LoRA adapter may target (not the output head)."""
    head = layers.head_names(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names.append(name)
        elif _is_linear(module) and name not in head and ".lora_" not in name and not name.endswith(".base_layer"):
            names.append(name)
    return names


def _is_linear(module: nn.Module) -> bool:
    return layers.is_linear(module)


def select_targets(model: nn.Module, targets: list[str] | str, regex: str | None) -> list[str]:
    """Names of the linear modules chosen by suffix list, 'all-linear' or a regex."""
    names = linear_names(model)
    if regex:
        chosen = [n for n in names if re.search(regex, n)]
        what = f"lora.target_regex = '{regex}'"
    elif targets == "all-linear":
        chosen, what = names, "lora.targets = all-linear"
    else:
        suffixes = [targets] if isinstance(targets, str) else list(targets)
        chosen = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
        what = f"lora.targets = {suffixes}"
    kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
    if not chosen:
        raise ConfigError(f"{what} matches no linear module; the model has: {kinds}")
    if not regex and targets != "all-linear":
        unmatched = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
        if unmatched:
            raise ConfigError(f"{what}: {', '.join(unmatched)} matches no linear module a LoRA adapter can "
                              f"target (never the output head); the model has: {kinds}")
    return chosen


def check_rank(model: nn.Module, names: list[str], r: int) -> None:
    """lora.r is at most min(in, out) of every targeted layer (a larger rank adds nothing but cost)."""
    for name in names:
        fan_in, fan_out = layers.linear_dims(model.get_submodule(name))
        if r > min(fan_in, fan_out):
            raise ConfigError(f"lora.r = {r} is larger than min(in, out) = {min(fan_in, fan_out)} of {name} "
                              f"({fan_in} -> {fan_out}); use lora.r <= {min(fan_in, fan_out)} or other targets")


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


ADAPTER_KINDS = ("lora_A", "lora_B", "lora_magnitude_vector")


def is_lora_param(name: str) -> bool:
    """True for the names of adapter parameters: LoRA A/B and DoRA's magnitude (one rule, used everywhere)."""
    return any(f".{kind}." in name for kind in ADAPTER_KINDS)


def is_loraplus_fast(name: str) -> bool:
    """LoRA+: the parameters trained at lr x lora.loraplus_lr_ratio: B, and DoRA's magnitude
    (a 1-D adapter parameter, grouped with B as PEFT's create_loraplus_optimizer does)."""
    return ".lora_B." in name or ".lora_magnitude_vector." in name


def is_adapter_param(name: str, adapter: str) -> bool:
    """True for the parameters of adapter `adapter` (`...lora_A.<adapter>.weight`, ...)."""
    return is_lora_param(name) and name.endswith(f".{adapter}.weight")


def freeze_base(model: nn.Module, adapter: str | None = None) -> None:
    """requires_grad only for the adapter parameters (of `adapter`, or of every adapter; not DoRA's
    frozen `base_norm`)."""
    for name, p in model.named_parameters():
        trainable = is_lora_param(name) and name.endswith(".weight") and (adapter is None or is_adapter_param(name, adapter))
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
    """The adapter's A and B (and DoRA magnitude) tensors, keyed as PEFT saves them (or as dtrain names them)."""
    out = {}
    for name, m in lora_modules(model):
        for kind in ADAPTER_KINDS:
            if adapter not in getattr(m, kind):
                continue
            t = getattr(m, kind)[adapter].weight
            key = to_peft_key(f"{name}.{kind}.{adapter}.weight", adapter) if peft_keys else f"{name}.{kind}.{adapter}.weight"
            out[key] = t
    return out


def to_peft_key(name: str, adapter: str) -> str:
    """'model.layers.0.q_proj.lora_A.x.weight' -> 'base_model.model.model.layers.0.q_proj.lora_A.weight';
    DoRA's '...lora_magnitude_vector.x.weight' -> '...lora_magnitude_vector' (PEFT saves it without '.weight')."""
    name = "base_model.model." + name.replace(f".{adapter}.weight", ".weight")
    return name.removesuffix(".weight") if name.endswith(".lora_magnitude_vector.weight") else name


def from_peft_key(key: str, adapter: str) -> str:
    """Inverse of to_peft_key (a magnitude key with '.weight' is read as well)."""
    name = key.removeprefix("base_model.model.")
    if name.endswith(".lora_magnitude_vector"):
        name += ".weight"
    for kind in ADAPTER_KINDS:
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
