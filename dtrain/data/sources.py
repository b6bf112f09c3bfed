"""The datasets of a run (data.path, or data.mix), the eval file, and the weighted mix."""

from __future__ import annotations

import dataclasses
import typing

import torch

from dtrain.config import types as config_types
from dtrain.config.schema import DataConfig


def sources(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """(settings, weight) of each training dataset: data.path alone, or each data.mix entry (its keys
    over the data section's)."""
    if cfg.mix is None:
        return [(cfg, 1.0)]
    hints = typing.get_type_hints(DataConfig)
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    out = []
    for i, entry in enumerate(cfg.mix):
        values = {
            k: config_types.check(v, hints[k], fields[k], f"data.mix[{i}].{k}", "data")
            for k, v in entry.items()
            if k != "weight"
        }
        out.append((dataclasses.replace(cfg, mix=None, **values), float(entry.get("weight", 1.0))))
    return out


def eval_source(cfg: DataConfig) -> DataConfig | None:
    """data.eval_path, read with the data section's own format and fields."""
    return None if cfg.eval_path is None else dataclasses.replace(cfg, path=cfg.eval_path, mix=None)


def mix(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, example) pairs of the training set: as many examples in all as the datasets hold,
    dataset i contributing round(total * w_i / sum(w)) of them (each of its examples once before any
    is repeated), in a seeded shuffle. One dataset: its examples in order."""
    if len(sizes) == 1:
        return [(0, j) for j in range(sizes[0])]
    total, wsum = sum(sizes), sum(weights)
    pairs = []
    for i, (n, w) in enumerate(zip(sizes, weights)):
        quota = round(total * w / wsum)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-quota // n))]) if quota else []
        pairs += [(i, int(j)) for j in order[:quota]]
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    return [pairs[int(k)] for k in perm]
