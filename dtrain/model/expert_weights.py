"""Fused expert weights read from checkpoints that store one tensor per expert.

transformers 5 keeps the experts of Qwen3-MoE / Mixtral as fused parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]), but the checkpoints on disk, the published ones and
those `save_pretrained` writes, keep the per-expert layout: `mlp.experts.<e>.gate_proj.weight` and
`up_proj` (Mixtral: `block_sparse_moe.experts.<e>.w1` / `w3`), `down_proj` (`w2`); transformers fuses
them while loading. This module says which per-expert tensors make a fused one (stacked over the
experts, gate and up concatenated along the output rows), for loading and for `dtrain merge`.
No torch at import.
"""

from __future__ import annotations

from collections.abc import Callable

# fused parameter -> the per-expert weights concatenated (in this order) along its output rows
LEGACY = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}


def stored_names(key: str) -> list[str]:
    """Other names a checkpoint may store `key` under: Mixtral's `block_sparse_moe` for `mlp`."""
    return [key.replace(".mlp.", ".block_sparse_moe.", 1)] if ".mlp." in key else []


def stored_key(key: str, has: Callable[[str], bool]) -> str | None:
    """`key`, or the older name a checkpoint stores it under, whichever the checkpoint `has`."""
    return next((k for k in (key, *stored_names(key)) if has(k)), None)


def per_expert_keys(name: str, has: Callable[[str], bool]) -> list[list[str]] | None:
    """For fused parameter `name`, per expert the checkpoint keys whose tensors, concatenated along
    dim 0, are that expert's slice; None when the checkpoint does not hold that layout."""
    module, _, leaf = name.rpartition(".")
    if leaf not in LEGACY or not module.endswith(".experts"):
        return None
    for parts in LEGACY[leaf]:
        experts, e = [], 0
        while has(f"{module}.{e}.{parts[0]}.weight"):
            experts.append([f"{module}.{e}.{p}.weight" for p in parts])
            e += 1
        if experts:
            return experts
    return None


def stored_per_expert(source, key: str) -> list[list[str]] | None:
    """per_expert_keys of fused weight `key` in a checkpoint source (its `key(name)` finds a tensor)."""
    return per_expert_keys(key, lambda k: source.key(k) is not None)


def stack(source, experts: list[list[str]], rows: slice | None):
    """The fused [E, ., .] tensor (or its `rows`: experts, read only those) from per-expert tensors."""
    import torch

    chosen = experts if rows is None else experts[rows]
    return torch.stack([torch.cat([source.read(k) for k in keys]) for keys in chosen])
