"""Adapters a run starts from, and the reference model of preference objectives, in one model.

* `lora.init_from: DIR`: the trained adapter starts from an existing one (dtrain's or PEFT's
  format) instead of A random / B zero; its r, alpha, variants and target modules must be the
  config's (one line names the first difference).
* `dpo.reference`: `base` is the same model with every adapter switched off; `adapter:DIR` is a
  second, frozen adapter named `reference` injected next to the trained one (before sharding, so
  it is sharded like the rest) and switched on for the reference pass. No second model is built.

Both are filled after the backend built and sharded the model, through `backend.load_full_state`,
so every backend places them as it places a resumed adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from dtrain.config.schema import Config
from dtrain.errors import ConfigError
from dtrain.lora import ops as lora, peft_format as adapter_lib
from dtrain.lora.layer import AdapterSpec

REFERENCE = "reference"  # the frozen reference adapter's name inside the model
PREFIX = "adapter:"


def reference_dir(cfg: Config) -> str | None:
    """The reference adapter's directory (dpo.reference = adapter:DIR), else None (the base)."""
    ref = cfg.dpo.reference
    wanted = cfg.objective == "dpo" and cfg.mode == "lora"  # `dtrain memory` measures full DPO without one
    return ref[len(PREFIX) :] if wanted and ref.startswith(PREFIX) else None


@contextlib.contextmanager
def active(model: nn.Module, name: str | None):
    """Inside, adapter `name` is the one every LoRA layer runs (None: none, the plain base); the
    previous choice is restored after."""
    layers = [m for _, m in lora.lora_modules(model)]
    before = [m.active_adapter for m in layers]
    for m in layers:
        m.active_adapter = name if name is not None and name in m.lora_A else None
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.active_adapter = b


def reference_pass(model: nn.Module, cfg: Config):
    """The context of the reference forward: the frozen reference adapter, or no adapter at all."""
    return active(model, REFERENCE if reference_dir(cfg) else None)


def _read(directory: str, what: str) -> tuple[AdapterSpec, dict[str, dict[str, torch.Tensor]]]:
    try:
        config, tensors = adapter_lib.read_adapter(directory)
        spec = adapter_lib.adapter_spec_from_peft(config, "x", directory)
        modules = adapter_lib.adapter_modules(tensors, directory, spec)
        adapter_lib.check_rank(modules, spec.r, directory)
    except ConfigError:
        raise
    except Exception as e:  # DtrainError and file errors: one line naming the key
        raise ConfigError(f"{what}: {e}") from None
    return spec, modules


def inject_reference(model: nn.Module, cfg: Config) -> None:
    """Add the frozen reference adapter's layers (empty; filled by `initial_tensors`)."""
    directory = reference_dir(cfg)
    if directory is None:
        return
    spec, modules = _read(directory, f"dpo.reference = '{cfg.dpo.reference}'")
    missing = [m for m in modules if not _has_module(model, m)]
    if missing:
        raise ConfigError(
            f"dpo.reference = '{cfg.dpo.reference}': the model has no module '{missing[0]}' "
            "(an adapter for another base?)"
        )
    spec = dataclasses.replace(spec, name=REFERENCE, dropout=0.0)  # the same variant; frozen: no dropout
    lora.inject(model, sorted(modules), spec)
    for _, m in lora.lora_modules(model):  # the trained adapter stays the active one
        if m.active_adapter == REFERENCE:
            m.active_adapter = cfg.lora.adapter_name if cfg.lora.adapter_name in m.lora_A else None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _check_init(cfg: Config, spec: AdapterSpec, modules: dict, trained: list[str]) -> None:
    """lora.init_from must be an adapter of exactly the config's shape."""
    at = f"lora.init_from = '{cfg.lora.init_from}'"
    c = cfg.lora
    for key, theirs, ours in (
        ("r", spec.r, c.r),
        ("alpha", spec.alpha, float(c.alpha)),
        ("use_rslora", spec.use_rslora, c.use_rslora),
        ("use_dora", spec.use_dora, c.use_dora),
    ):
        if theirs != ours:
            raise ConfigError(f"{at}: the adapter has {key} = {theirs}, the config lora.{key} = {ours}")
    if set(modules) != set(trained):
        extra, lacking = sorted(set(modules) - set(trained)), sorted(set(trained) - set(modules))
        what = (
            f"adapts '{extra[0]}', which lora.targets does not select"
            if extra
            else f"does not adapt '{lacking[0]}', which lora.targets selects"
        )
        raise ConfigError(f"{at}: the adapter {what} ({len(modules)} vs {len(trained)} modules)")


def initial_tensors(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """Full tensors by parameter name: lora.init_from's for the trained adapter, the reference
    adapter's; empty when neither is set."""
    out: dict[str, torch.Tensor] = {}
    if cfg.lora.init_from is not None:
        spec, modules = _read(cfg.lora.init_from, f"lora.init_from = '{cfg.lora.init_from}'")
        trained = sorted(n for n, m in lora.lora_modules(model) if cfg.lora.adapter_name in m.lora_A)
        _check_init(cfg, spec, modules, trained)
        out.update(_named(modules, cfg.lora.adapter_name))
    if reference_dir(cfg) is not None:
        _, modules = _read(reference_dir(cfg), f"dpo.reference = '{cfg.dpo.reference}'")
        out.update(_named(modules, REFERENCE))
    return out


def _named(modules: dict[str, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    return {f"{m}.{kind}.{name}.weight": t.float() for m, ab in modules.items() for kind, t in ab.items()}


def describe(cfg: Config) -> list[str]:
    lines = []
    if cfg.lora.init_from is not None:
        lines.append(f"adapter '{cfg.lora.adapter_name}' starts from {Path(cfg.lora.init_from)}")
    if cfg.objective == "dpo":
        ref = reference_dir(cfg)
        lines.append(
            f"dpo: loss {cfg.dpo.loss}, beta {cfg.dpo.beta}; reference: "
            + (f"frozen adapter {ref}" if ref else "the base (adapter off), no second model")
        )
    return lines
