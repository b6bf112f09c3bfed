"""LoRA variants: one strategy object per adapter of a layer (PEFT's `LoraVariant` idea).

A LoRALinear picks its adapter's variant once (`for_spec`) and calls it for everything that
differs between variants: the extra state the variant owns, its initial value, the forward pass,
merge and unmerge. The layer knows no variant's maths. `Plain` is Hu et al.'s LoRA; rsLoRA is not a
variant but a scale (`AdapterSpec.scaling`, alpha / sqrt(r)) that every variant uses.

Adding a variant: a module holding a LoraVariant subclass, its line in VARIANTS (the flag is both
the `lora.<flag>` config key and PEFT's adapter_config.json key, and a field of AdapterSpec), and
its test. No distributed code here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

import torch

from dtrain.errors import ConfigError

if TYPE_CHECKING:  # the layer calls the variant with itself; no import of layer.py at run time
    from torch import nn

# flag -> "module:class" of the variant that flag switches on (imported on first use)
VARIANTS: dict[str, str] = {"use_dora": "dtrain.lora.dora:DoRA"}


class LoraVariant:
    """What a variant does to one adapter `name` of a LoRA layer. The defaults are plain LoRA's."""

    flag: str | None = None  # the AdapterSpec / config / PEFT flag that selects it (None: plain LoRA)
    state: tuple[str, ...] = ()  # ModuleDicts of adapter state it adds (PEFT's names; saved, resumed)
    fast_state: tuple[str, ...] = ()  # of those, what LoRA+ trains at the fast rate (as B)
    name: str = "LoRA"  # in messages
    title: str = "LoRA"  # of its state, in messages ("has a DoRA magnitude but ...")
    conv1d: bool = True  # adapts a Conv1D layer (weight stored [in, out], PEFT's fan_in_fan_out)

    def init(self, layer: nn.Module, name: str, device: torch.device) -> None:
        """Check that the variant can adapt `layer`, then add its state for adapter `name`
        (empty on the meta device)."""

    def reset(self, layer: nn.Module, name: str) -> None:
        """Set the variant's state to its exact starting value (A and B are already reset)."""

    def initial_state(
        self, layer: nn.Module, name: str, leaf: str, read: Callable[[slice | None], torch.Tensor], rows: slice | None
    ) -> torch.Tensor:
        """The starting value of `<kind>.<name>.<leaf>` (rows of it) from the base weight's source:
        `read(rows)` gives the float checkpoint weight (for a sharded or empty model)."""
        raise KeyError(f"{layer.qualified_name}: plain LoRA has no state '{leaf}'")

    def saved_shape(self, kind: str, fan_in: int, fan_out: int) -> tuple[int, ...]:
        """The shape state `kind` is saved with in the adapter file, for a layer fan_in -> fan_out."""
        raise KeyError(f"plain LoRA has no state '{kind}'")

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output, given `out` = base_layer(x) (bias included) and `h` = x in the LoRA dtype."""
        a, b = layer.lora_A[name], layer.lora_B[name]
        return out + (b(a(layer.lora_dropout[name](h))) * layer.scaling[name]).to(out.dtype)

    def merge(self, layer: nn.Module, name: str, w: torch.Tensor) -> None:
        """Fold adapter `name` into the base layer's float weight `w` (in place, under no_grad)."""
        w.add_(layer.stored_delta(name).to(w.dtype))

    def unmerge(self, layer: nn.Module, name: str, w: torch.Tensor) -> None:
        """Take adapter `name` out of the merged weight `w` again (in place, under no_grad)."""
        w.sub_(layer.stored_delta(name).to(w.dtype))

    def merged_tensor(self, w: torch.Tensor, delta: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A checkpoint weight [out, in] with the adapter merged, in float32, from the adapter's
        saved tensors by kind (`dtrain merge`, which has no layer): W + s B A."""
        return w.float() + delta


class Plain(LoraVariant):
    """Hu et al.'s LoRA (and, with `use_rslora`, rsLoRA): h = W0 x + s B A dropout(x)."""


@functools.cache
def classes() -> tuple[type[LoraVariant], ...]:
    """Every registered variant class, in VARIANTS order."""
    out = []
    for target in VARIANTS.values():
        module, _, name = target.partition(":")
        out.append(getattr(import_module(module), name))
    return tuple(out)


def for_spec(spec: object) -> LoraVariant:
    """A new variant object for adapter `spec` (an AdapterSpec): the one its flag selects, else Plain."""
    chosen = [cls for cls in classes() if getattr(spec, cls.flag, False)]
    if len(chosen) > 1:
        raise ConfigError(f"lora: {' and '.join(c.flag for c in chosen)} cannot be combined; set one")
    return chosen[0]() if chosen else Plain()


def state_kinds() -> tuple[str, ...]:
    """The state ModuleDicts of all variants (every LoRA layer has them, empty unless used)."""
    return tuple(kind for cls in classes() for kind in cls.state)


def fast_kinds() -> tuple[str, ...]:
    """The variants' state that LoRA+ trains at B's rate."""
    return tuple(kind for cls in classes() for kind in cls.fast_state)


def owner(kind: str) -> type[LoraVariant]:
    """The variant class whose state `kind` is."""
    return next(cls for cls in classes() if kind in cls.state)
