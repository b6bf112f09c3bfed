"""Every analysis over every adapted layer of one or more adapters, as one json-able dict.

    {"adapters": [{"label", "path", "r", "alpha", "scaling", "modules": {module: {...}},
                   "by_type": {"q_proj": {means over layers}}}],
     "pairs": [{"a", "b", "by_type": {"q_proj": {"phi": [[...]], "layers": [...], summary...}},
                "modules": {module: summary}}]}

A layer type is a module name's last component (q_proj, v_proj, ...); `layer` (the first integer
in a module name, e.g. model.layers.12.self_attn.q_proj -> 12) restricts the per-type numbers and
heatmaps to that layer, as the paper's Figures 3-4 and Table 7 show layer 48 of GPT-3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dtrain.analysis import delta, subspace
from dtrain.analysis.weights import BaseWeights
from dtrain.errors import DtrainError

_RELATE_KEYS = ("delta_norm", "w_norm", "proj_delta", "proj_w", "proj_random", "amplification")
_SPECTRUM_KEYS = ("effective_rank", "rank_1pct")


@dataclass
class Adapter:
    label: str
    path: Path
    r: int
    alpha: float
    modules: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def load_adapter(path: str | Path, label: str) -> Adapter:
    """A dtrain or PEFT LoRA adapter directory, read with dtrain.lora.peft_format (checksums, shapes, rank)."""
    from dtrain.lora import peft_format as adapter_lib

    config, tensors = adapter_lib.read_adapter(path)
    spec = adapter_lib.adapter_spec_from_peft(config, label, path)
    modules = adapter_lib.adapter_modules(tensors, path)
    modules, _ = _per_expert(modules, config.get("target_parameters") or [], spec.r)
    adapter_lib.check_rank(modules, spec.r, path)
    return Adapter(label, Path(path), spec.r, spec.alpha, modules)


# transformers' experts modules register their fused weights in this order (PEFT nests in it)
_EXPERT_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


def _per_expert(modules: dict, target_parameters: list[str], r: int) -> tuple[dict, dict]:
    """Fused expert adapters (PEFT's ParamWrapper: A [r*E, in], B [out, r*E]) split into one
    module per expert, `<experts>.<e>.<param>` (A_e, B_e): each is a rank-r update of its own."""
    params = sorted(
        {t.rsplit(".", 1)[-1] for t in target_parameters} - {"weight"},  # a router's weight: A [r, in], one module
        key=lambda p: (_EXPERT_ORDER.index(p) if p in _EXPERT_ORDER else len(_EXPERT_ORDER), p),
    )
    out, counts = {}, {}
    for name, ab in modules.items():
        depth = len(re.findall(r"\.base_layer", name))
        if not params or ab["lora_A"].shape[0] == r or depth >= len(params):
            out[name] = ab
            continue
        experts_module = re.sub(r"(\.base_layer)+$", "", name)
        param = params[len(params) - 1 - depth]  # the outermost wrapper holds the last parameter
        e = ab["lora_A"].shape[0] // r
        a3 = ab["lora_A"].reshape(e, r, -1)
        b3 = ab["lora_B"].reshape(ab["lora_B"].shape[0], r, e).permute(2, 0, 1)
        for i in range(e):
            out[f"{experts_module}.{i}.{param}"] = {"lora_A": a3[i], "lora_B": b3[i]}
        counts[experts_module] = e
    return out, counts


def layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{module}.")
    return int(m.group(1)) if m else None


def _selected(modules, layer: int | None) -> list[str]:
    return sorted((m for m in modules if layer is None or layer_index(m) == layer), key=_order)


def _order(module: str) -> tuple:
    i = layer_index(module)
    return (layer_type(module), -1 if i is None else i, module)


def analyze_one(ad: Adapter, base: BaseWeights | None, layer: int | None = None, seed: int = 0) -> dict:
    """Spectrum and effective rank of every ΔW, and (with a base) Table 7's numbers; per-type means."""
    modules = {}
    for name in sorted(ad.modules, key=_order):
        ab = ad.modules[name]
        row = {
            "type": layer_type(name),
            "layer": layer_index(name),
            **delta.spectrum(ab["lora_B"], ab["lora_A"], ad.scaling),
        }
        if base is not None:
            w = base.weight(name)
            if w.dim() == 2 and w.shape != (ab["lora_B"].shape[0], ab["lora_A"].shape[1]):
                w = w.T  # an expert of a transposed fused weight (gpt-oss: [in, out])
            row.update(
                delta.relate_to_base(
                    w, ab["lora_B"], ab["lora_A"], ad.scaling, seed=seed, sw=base.singular_values(name, w)
                )
            )
        modules[name] = row
    by_type: dict[str, dict] = {}
    for name in _selected(modules, layer):
        by_type.setdefault(layer_type(name), []).append(modules[name])
    keys = _SPECTRUM_KEYS + (_RELATE_KEYS if base is not None else ())
    summary = {
        t: {"layers": len(rows), **{k: float(np.mean([x[k] for x in rows])) for k in keys}}
        for t, rows in by_type.items()
    }
    return {
        "label": ad.label,
        "path": str(ad.path),
        "r": ad.r,
        "alpha": ad.alpha,
        "scaling": ad.scaling,
        "modules": modules,
        "by_type": summary,
    }


def compare(a: Adapter, b: Adapter, layer: int | None = None) -> dict:
    """phi for every module both adapters adapt; per type, phi averaged over those layers."""
    shared = _selected(set(a.modules) & set(b.modules), None)
    if not shared:
        raise DtrainError(f"adapters '{a.path}' and '{b.path}' adapt no module in common")
    per_module, mats = {}, {}
    for name in shared:
        p = subspace.phi(a.modules[name]["lora_A"], b.modules[name]["lora_A"])
        dim = int(a.modules[name]["lora_A"].shape[1])
        per_module[name] = {"type": layer_type(name), "layer": layer_index(name), **subspace.summary(p, dim)}
        if layer is None or layer_index(name) == layer:
            mats.setdefault(layer_type(name), []).append((layer_index(name), p, dim))
    by_type = {}
    for t, items in mats.items():
        mean = np.mean([p for _, p, _ in items], axis=0)
        by_type[t] = {"layers": [i for i, _, _ in items], **subspace.summary(mean, items[0][2]), "phi": mean.tolist()}
    if not by_type:
        raise DtrainError(f"--layer {layer}: no module of that layer is adapted by both adapters")
    return {"a": a.label, "b": b.label, "r_a": a.r, "r_b": b.r, "by_type": by_type, "modules": per_module}


def analyze(adapters: list[Adapter], base: BaseWeights | None, layer: int | None = None, seed: int = 0) -> dict:
    """Every adapter on its own, and every pair of them compared."""
    if layer is not None:
        for ad in adapters:
            if not _selected(ad.modules, layer):
                raise DtrainError(f"--layer {layer}: adapter '{ad.path}' adapts no module of that layer")
    pairs = [compare(a, b, layer) for i, a in enumerate(adapters) for b in adapters[i + 1 :]]
    return {
        "layer": layer,
        "base": str(base.dir) if base is not None else None,
        "base_bits": base.bits if base is not None else None,
        "adapters": [analyze_one(ad, base, layer, seed) for ad in adapters],
        "pairs": pairs,
    }
