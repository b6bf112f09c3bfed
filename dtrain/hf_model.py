"""What transformers says about a model that dtrain's build follows, instead of guessing per
architecture: the non-persistent buffers its `_init_weights` computes, and the renamings of
checkpoint keys to module names it applies when loading. No ranks, no sharding here.
"""

from __future__ import annotations

import torch
from torch import nn

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
    left = [f"{type(m).__name__}.{n}" for m, n in owners if m._buffers[n].is_floating_point()
            and bool(torch.isnan(m._buffers[n]).any())]
    if left:
        raise ConfigError(f"model: {model.config.model_type}: the model's _init_weights does not compute the "
                          f"buffer {left[0]}, which dtrain needs to build it on the meta device")


def _non_persistent_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module, name) for module in model.modules() for name, buf in module._buffers.items()
            if buf is not None and name in module._non_persistent_buffers_set]


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
