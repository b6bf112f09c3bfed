"""LoRA itself: `layer` (LoRALinear, AdapterSpec), `variants` (the variant interface and plain
LoRA; rsLoRA is a scale), `dora` (the DoRA variant), `base_weight` (a base layer's float weight),
`ops` (inject, freeze, merge, adapter state, PEFT keys), `targets` (which linears: presets and
selection), `experts` (LoRA on fused 3-D expert weights), `router` (LoRA on an MoE router's
weight) and `peft_format` (adapters read and written in PEFT's format). No rank, no backend here.

The public names are importable from here: `from dtrain.lora import LoRALinear, inject`."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {name: "dtrain.lora.layer" for name in ("AdapterSpec", "LoRALinear", "init_lora_A")}
_PUBLIC.update({name: "dtrain.lora.targets" for name in ("linear_names", "select_targets")})
_PUBLIC.update(
    {
        name: "dtrain.lora.ops"
        for name in (
            "check_rank",
            "inject",
            "lora_modules",
            "is_lora_param",
            "is_loraplus_fast",
            "is_adapter_param",
            "freeze_base",
            "set_adapter",
            "merge",
            "unmerge",
            "unwrap",
            "adapter_state_dict",
            "to_peft_key",
            "from_peft_key",
            "count_parameters",
        )
    }
)
_PUBLIC.update({name: "dtrain.lora.peft_format" for name in ("save_adapter", "read_adapter", "load_adapter")})


def __getattr__(name: str) -> Any:  # lazy: a submodule's import must not pull in the others
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dtrain.lora' has no attribute {name!r}")
