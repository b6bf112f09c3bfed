"""The whole (logical) shape and size of a parameter, wherever its storage lives.

A DTensor (FSDP2) already reports its global shape. A DeepSpeed ZeRO-3 partitioned parameter
holds an empty placeholder and keeps its full shape and size in the `ds_shape` / `ds_numel`
attributes, read here with getattr: no distributed import, no question of which rank this is.
"""

from __future__ import annotations

import torch


def logical_shape(p: torch.Tensor) -> torch.Size:
    """The full shape of `p`, sharded or not."""
    ds = getattr(p, "ds_shape", None)
    return torch.Size(ds) if ds is not None else p.shape


def logical_numel(p: torch.Tensor) -> int:
    """The full number of elements of `p`, sharded or not."""
    ds = getattr(p, "ds_numel", None)
    return int(ds) if ds is not None else p.numel()
