r"""LoRA as in Hu et al. (2021): a frozen weight plus a trainable low-rank update.

        x ──────────────┬──────────────► W0 x ──────┐
                        │                           (+) ──► h = W0 x + (alpha / r) B A x
                        └─► dropout ─► A ─► B ─► × (alpha / r)

W0 (the wrapped `base_layer`) is frozen. A (r x in) is random, B (out x r) is zero, so the model's
output is unchanged before the first step. `merge()` folds (alpha / r) B A into W0 (no added
latency at inference); `unmerge()` takes it out again. Several named adapters may sit on one base;
`set_adapter()` switches which one is active. Plain torch: no distributed code in this file.

Variants (docs/lora_variants.md): each adapter has a variant object (dtrain.lora.variants) that
does what differs between them: plain LoRA, or DoRA's learned magnitude per output row
(`use_dora`, dtrain/lora/dora.py). rsLoRA is a scale, alpha / sqrt(r) (`AdapterSpec.use_rslora`);
LoRA+ is an optimizer setting (`ops.is_loraplus_fast`, optim.optimizer_groups). The model-level
operations (inject, merge, freezing, adapter state) are in dtrain.lora.ops.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.lora import base_weight, variants
from dtrain.model import layers


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters (a variant's flag, e.g. `use_dora`, selects its variant)."""

    name: str = "default"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init_seed: int = 0
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA (the one place rsLoRA acts; every variant uses it)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class AdapterLinear(nn.Linear):
    """LoRA's A or B: an nn.Linear that, called without input, returns a detached copy of its weight
    (read inside its own call, where sharding backends have gathered it: DoRA's norms need it)."""

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            return self.weight.detach().clone()
        return super().forward(x)


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters (PEFT's parameter naming); what differs
    between variants is done by each adapter's variant object (`lora_variant[name]`)."""

    def __init__(self, base_layer: nn.Module, qualified_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layers.linear_dims(base_layer)
        # The checkpoint stores the weight [in, out] (a Conv1D, quantized or not): PEFT's flag
        self.fan_in_fan_out = layers.is_conv1d(base_layer) or getattr(base_layer, "stored_transposed", False)
        self.qualified_name = qualified_name
        self.init_adapters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def init_adapters(self) -> None:
        """The empty adapter containers (PEFT's names): A, B, dropout, every variant's state dicts
        (empty unless an adapter of that variant uses them), and the variant object of each adapter."""
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        for kind in variants.state_kinds():
            setattr(self, kind, nn.ModuleDict())
        self.lora_variant: dict[str, variants.LoraVariant] = {}
        self.scaling: dict[str, float] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None

    def add_adapter(self, spec: AdapterSpec) -> None:
        """Add an adapter: A from a generator seeded by (seed, module name), B zero, and the state
        of its variant.

        A and B are float32 whatever the base's dtype (the trainable part keeps full precision).
        """
        variant = variants.for_spec(spec)
        device = next(self.base_layer.parameters()).device  # meta when the model is built empty
        variant.init(self, spec.name, device)  # refuses a layer it cannot adapt before anything is added
        a = AdapterLinear(self.in_features, spec.r, bias=False, device=device)
        b = AdapterLinear(spec.r, self.out_features, bias=False, device=device)
        self.lora_A[spec.name] = a
        self.lora_B[spec.name] = b
        self.specs[spec.name] = spec
        self.scaling[spec.name] = spec.scaling
        self.lora_variant[spec.name] = variant
        if a.weight.device.type != "meta":
            self.reset_adapter(spec.name)
        self.lora_dropout[spec.name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        if self.active_adapter is None:
            self.active_adapter = spec.name

    def reset_adapter(self, name: str) -> None:
        """A from its name-seeded init, B zero, the variant's state at its start (DoRA: m = ||W0||_row,
        left to the loader where the base weight is not whole): the adapter's exact starting point."""
        with torch.no_grad():
            self.lora_A[name].weight.copy_(self.initial_value("lora_A", name))
            self.lora_B[name].weight.zero_()
            self.lora_variant[name].reset(self, name)

    def initial_value(self, kind: str, name: str) -> torch.Tensor:
        """The full initial tensor of `lora_A` or `lora_B` of adapter `name` (a variant's state may
        depend on the base weight: its `initial_state` computes it from the weight source)."""
        spec = self.specs[name]
        if kind == "lora_B":
            return torch.zeros(self.out_features, spec.r)
        return init_lora_A(self.qualified_name, spec, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        x, h = _inputs(x, self.lora_A[name].weight.dtype)
        return self.lora_variant[name].forward(self, name, x, h, self.base_layer(x))

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
        self.base_layer = base_weight.float_linear(self.base_layer)
        name = self.active_adapter
        with torch.no_grad():
            self.lora_variant[name].merge(self, name, self.base_layer.weight.data)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight again."""
        if self.merged_adapter is None:
            if self.active_adapter is None:
                return
            raise RuntimeError(f"{self.qualified_name}: no adapter is merged")
        name = self.merged_adapter
        with torch.no_grad():
            self.lora_variant[name].unmerge(self, name, self.base_layer.weight.data)
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


def init_lora_A(qualified_name: str, spec: AdapterSpec, in_features: int) -> torch.Tensor:
    """A's initial value: Kaiming-uniform (as nn.Linear) from a name-seeded generator.

    Every rank and every backend computes the same tensor without communicating.
    """
    seed = zlib.crc32(f"{spec.init_seed}:{spec.name}:{qualified_name}".encode())
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
    return (torch.rand(spec.r, in_features, generator=g) * 2 - 1) * bound
