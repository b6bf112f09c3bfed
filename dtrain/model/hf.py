"""What transformers says about a model that dtrain's build follows, instead of guessing per
architecture: the non-persistent buffers its `_init_weights` computes, and the renamings of
checkpoint keys to module names it applies when loading, whether it builds a causal LM from a
config. No ranks, no sharding here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from dtrain.errors import ConfigError


def restore_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers (rotary inv_freq, Gemma's embedding scale) that a meta
    build left empty, as the model's own `_init_weights` computes them.

    Never by re-constructing a module from a guessed signature (Gemma's scaled embedding takes no
    config): the parameters are marked initialized for the call, so transformers' init functions
    skip them and only the buffers are written. A buffer the model does not initialize is one line.
    """
    owners = _non_persistent_buffers(model)
    for module, name in owners:
        empty = torch.empty_like(module._buffers[name], device=device)
        module._buffers[name] = empty.fill_(float("nan")) if empty.is_floating_point() else empty.zero_()
    init = getattr(model, "_init_weights", None)
    if not owners or not callable(init):
        return
    marked = [p for p in model.parameters() if not getattr(p, "_is_hf_initialized", False)]
    for p in marked:
        p._is_hf_initialized = True
    try:
        with torch.no_grad():
            for module in dict.fromkeys(m for m, _ in owners):
                init(module)
    finally:
        for p in marked:
            del p._is_hf_initialized
    left = [
        f"{type(m).__name__}.{n}"
        for m, n in owners
        if m._buffers[n].is_floating_point() and bool(torch.isnan(m._buffers[n]).any())
    ]
    if left:
        raise ConfigError(
            f"model: {model.config.model_type}: the model's _init_weights does not compute the "
            f"buffer {left[0]}, which dtrain needs to build it on the meta device"
        )


def _non_persistent_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (module, name)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None and name in module._non_persistent_buffers_set
    ]


def checkpoint_renamings(model: nn.Module) -> list:
    """The key renamings transformers applies when it loads a checkpoint into `model` (its
    conversion mapping, the renames only: tensors that are split or fused are not renamed).
    Empty on a transformers release without conversion mappings."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def renamed_keys(keys: list[str], renamings: list) -> dict[str, str]:
    """{module-side name: stored key} of the stored keys that the renamings change (in sorted key
    order, as transformers applies them: some renamings activate on an earlier key)."""
    if not renamings:
        return {}
    from transformers.core_model_loading import apply_renamings

    out = {}
    for key in keys:
        renamed = apply_renamings(key, renamings)
        if renamed != key:
            out[renamed] = key
    return out


def check_causal_lm(config: PretrainedConfig, trust_remote_code: bool) -> None:
    """The config's model is a causal LM transformers can build: one line naming the model type
    and what is missing otherwise (no causal-LM head, custom code not trusted)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if custom and not trust_remote_code:
        raise ConfigError(
            f"model: {config.model_type} is custom code (auto_map in its config.json), which dtrain "
            "runs only with model.trust_remote_code=true"
        )
    if not custom:
        raise ConfigError(
            f"model: {config.model_type} has no causal-LM head in transformers (no "
            "AutoModelForCausalLM class for it): dtrain trains causal language models"
        )


def custom_model_type(path: Path) -> str | None:
    """The model type of a config.json that maps its classes to custom code (auto_map), else None."""
    import json

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return str(raw.get("model_type", "this model")) if isinstance(raw, dict) and raw.get("auto_map") else None


def causal_lm_class(config: PretrainedConfig, trust_remote_code: bool = False) -> type | None:
    """The class AutoModelForCausalLM builds for `config`: transformers' own, or the custom code its
    auto_map names when that is trusted; None when there is neither."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    ref = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if not (ref and trust_remote_code):
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(ref, config.name_or_path)


def fit_attention(config: PretrainedConfig, trust_remote_code: bool = False) -> None:
    """sdpa (model.attn_implementation's default) on an architecture without it (Gemma 2, gpt-oss's
    attention sinks, custom code that never declared it) becomes eager, as transformers itself
    chooses when no kernel is asked for; any other choice is kept."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    cls = causal_lm_class(config, trust_remote_code)
    if cls is not None and not getattr(cls, "_supports_sdpa", True):
        config._attn_implementation = "eager"
