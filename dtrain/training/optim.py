"""The optimizer and its schedule, one home for every backend: AdamW over the trainable (LoRA)
parameters, LoRA+'s two groups, warmup + cosine, and AdamW's hyper-parameters as plain data (the
checkpoint's). DeepSpeed hands the same schedule to its engine (backends/deepspeed.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dtrain.config.schema import Config
from dtrain.lora import ops as lora


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """The optimizer's parameter groups: one (every trainable parameter at training.lr), or
    with LoRA+ (`lora.loraplus_lr_ratio`) two: A at lr, then B and DoRA's magnitude at
    lr x ratio. The schedule scales both alike (LambdaLR multiplies each group's initial lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = cfg.lora.loraplus_lr_ratio
    if cfg.mode != "lora" or ratio is None or ratio == 1:
        return [{"params": [p for _, p in named]}]
    lr = cfg.training.lr
    return [
        {"params": [p for n, p in named if not lora.is_loraplus_fast(n)], "lr": lr},
        {"params": [p for n, p in named if lora.is_loraplus_fast(n)], "lr": lr * ratio},
    ]


def schedule(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: warmup, then cosine to training.min_lr_ratio."""
    t = cfg.training
    return lambda s: lr_factor(s, t.warmup_steps, total_steps, t.min_lr_ratio)


def make_adamw(params: list[nn.Parameter] | list[dict], cfg: Config) -> torch.optim.AdamW:
    t = cfg.training
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)


HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def hyper(group: dict) -> dict:
    """AdamW's hyper-parameters of a param group, plain data."""
    return {k: (list(group[k]) if isinstance(group[k], tuple) else float(group[k])) for k in HYPER if k in group}


def set_hyper(group: dict, hyper: dict) -> None:
    for k, v in hyper.items():
        group[k] = tuple(v) if isinstance(v, list) else v
