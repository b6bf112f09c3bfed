"""Checks of a built Config that go beyond one field's type and range: files the config names,
keys that exclude each other, regexes, names, and the sizes of an inline model architecture.

Each failure is one ConfigError line naming where the value came from (the config file, or the
command-line override that set it), the key, and what is allowed. Nothing here imports torch or
transformers: `dtrain train` reports these before its heavy imports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from dtrain.config import names
from dtrain.config.types import parse_duration
from dtrain.errors import ConfigError

Where = Callable[[str], str]  # dotted key -> "<config file>" or "override 'key=value'"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# model.arch keys that size the model: positive integers when given; other `*_size` keys (an MoE
# expert's size, ...) may be 0 but never negative or fractional
_CORE_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
    "n_embd",
    "n_head",
    "n_layer",
    "n_positions",
    "n_inner",
)


def validate(cfg, where: Where) -> None:
    """Every cross-field check, in the order a user would fix them."""
    _check_model(cfg.model, where)
    _check_lora(cfg.lora, where)
    _check_variants(cfg, where)
    _check_paths(cfg, where)
    _check_objective(cfg, where)
    _check_logging(cfg.logging, where)
    if cfg.training.time_limit is not None:  # parsed now: a typo fails at once, not hours later
        parse_duration(cfg.training.time_limit, f"{where('training.time_limit')}: training.time_limit")


def _check_logging(logging_cfg, where: Where) -> None:
    """Each configured metric logger's package is installed (found, not imported)."""
    from dtrain import loggers

    loggers.check_installed(logging_cfg.backends, f"{where('logging.backends')}: logging.backends")


def _check_model(model, where: Where) -> None:
    if model.path is not None and model.arch is not None:
        raise ConfigError(
            f"{where('model.arch')}: model.path and model.arch are both set; set one: model.path "
            "(a local model directory) or model.arch (an inline architecture, random weights)"
        )
    if model.path is None and model.arch is None:
        raise ConfigError(f"{where('model')}: model: set model.path (local dir) or model.arch (inline)")
    if model.path is not None and not Path(model.path).is_dir() and not names.is_named_model(model.path):
        why = names.gguf_hint(model.path, "model.path") or f"model.path = '{model.path}': directory not found"
        raise ConfigError(f"{where('model.path')}: {why}")
    if model.arch is not None:
        check_arch(model.arch, where)
    _check_attention(model.attn_implementation, where)


ATTN_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def _check_attention(impl: str, where: Where) -> None:
    """The GPU kernels need CUDA and (flash) their package: one line here, not transformers' ImportError."""
    import importlib.util

    if impl in ("sdpa", "eager"):
        return
    import torch

    package = ATTN_PACKAGES.get(impl)
    if not torch.cuda.is_available() or (package and importlib.util.find_spec(package) is None):
        need = f"CUDA and the {package} package" if package else "CUDA"
        raise ConfigError(
            f"{where('model.attn_implementation')}: model.attn_implementation = {impl} needs "
            f"{need}; use sdpa or eager here"
        )


def check_arch(arch: dict, where: Where) -> None:
    """model_type present; sizes positive integers; heads dividing the hidden size."""
    if not isinstance(arch.get("model_type"), str) or not arch["model_type"]:
        raise ConfigError(f"{where('model.arch.model_type')}: model.arch: needs 'model_type' (e.g. llama)")
    for key, value in arch.items():
        core = key in _CORE_SIZES
        if not (core or str(key).endswith("_size")) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if core else 0):
            need = "a positive integer" if core else "an integer >= 0"
            raise ConfigError(f"{where(f'model.arch.{key}')}: model.arch.{key} = {value!r}: must be {need}")
    hidden, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    if hidden and heads and hidden % heads and "head_dim" not in arch:
        raise ConfigError(
            f"{where('model.arch.num_attention_heads')}: model.arch.num_attention_heads = {heads} "
            f"does not divide model.arch.hidden_size = {hidden}"
        )
    kv = arch.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ConfigError(
            f"{where('model.arch.num_key_value_heads')}: model.arch.num_key_value_heads = {kv} "
            f"does not divide model.arch.num_attention_heads = {heads}"
        )


def _check_lora(lora, where: Where) -> None:
    if lora.target_regex is not None:
        try:
            re.compile(lora.target_regex)
        except re.error as e:
            raise ConfigError(
                f"{where('lora.target_regex')}: lora.target_regex = {lora.target_regex!r}: not a "
                f"valid regular expression ({e})"
            ) from None
    if not ADAPTER_NAME.fullmatch(lora.adapter_name):
        raise ConfigError(
            f"{where('lora.adapter_name')}: lora.adapter_name = {lora.adapter_name!r}: use letters, "
            "digits, _ and - only (it becomes part of parameter names; no dots)"
        )
    targets = [lora.targets] if isinstance(lora.targets, str) else lora.targets
    if lora.target_parameters is not None and (not lora.target_parameters or not all(lora.target_parameters)):
        raise ConfigError(
            f"{where('lora.target_parameters')}: lora.target_parameters = {lora.target_parameters!r}: "
            "needs parameter-name suffixes (e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj])"
        )
    if not targets and lora.target_parameters:
        return  # expert weights only
    if not targets or any(not t for t in targets):
        raise ConfigError(
            f"{where('lora.targets')}: lora.targets = {lora.targets!r}: needs module-name "
            "suffixes (e.g. [q_proj, v_proj]) or a preset (attention-qv, attention, mlp, all-linear, "
            "experts, all)"
        )


def _check_variants(cfg, where: Where) -> None:
    """The LoRA variants (docs/lora_variants.md) change the adapter: mode full has none."""
    if cfg.mode == "lora":
        return
    for key in ("use_rslora", "use_dora", "loraplus_lr_ratio"):
        value = getattr(cfg.lora, key)
        if value not in (None, False):
            raise ConfigError(
                f"{where('lora.' + key)}: lora.{key} = {value!r} needs mode: lora "
                f"(mode is {cfg.mode}: every weight trains, there is no adapter)"
            )


def _formats(data) -> list[str]:
    return [str(e.get("format", data.format)) for e in data.mix] if data.mix else [data.format]


def _check_objective(cfg, where: Where) -> None:
    """objective: dpo needs preference data, an adapter (its reference is the base without it, or
    a frozen earlier adapter) and unpacked rows; preference data needs objective: dpo."""
    dpo, formats = cfg.objective == "dpo", _formats(cfg.data)
    if dpo != all(f == "preference" for f in formats) or (not dpo and "preference" in formats):
        raise ConfigError(
            f"{where('objective')}: objective = {cfg.objective} with data.format = "
            f"{', '.join(sorted(set(formats)))}: objective dpo needs data.format: preference "
            "(prompt/chosen/rejected records), and preference data needs objective: dpo"
        )
    if cfg.lora.init_from is not None:
        if cfg.mode != "lora":
            raise ConfigError(f"{where('lora.init_from')}: lora.init_from needs mode: lora (mode is {cfg.mode})")
        if not Path(cfg.lora.init_from).is_dir():
            raise ConfigError(
                f"{where('lora.init_from')}: lora.init_from = '{cfg.lora.init_from}': directory not found"
            )
    if not dpo:
        return
    ref = cfg.dpo.reference
    if cfg.mode != "lora":
        raise ConfigError(
            f"{where('mode')}: objective dpo with mode: full and dpo.reference = {ref}: there is no "
            "frozen base to be the reference when every weight trains; use mode: lora"
        )
    if ref != "base" and not (ref.startswith("adapter:") and ref[len("adapter:") :]):
        raise ConfigError(f"{where('dpo.reference')}: dpo.reference = {ref!r}: use base or adapter:DIR")
    if ref != "base" and not Path(ref[len("adapter:") :]).is_dir():
        raise ConfigError(f"{where('dpo.reference')}: dpo.reference = {ref!r}: directory not found")
    if cfg.data.group_by_length:
        raise ConfigError(
            f"{where('data.group_by_length')}: data.group_by_length = true with objective dpo: not "
            "supported (pairs are batched in the seeded order); set data.group_by_length: false"
        )
    if cfg.data.packing:
        raise ConfigError(
            f"{where('data.packing')}: data.packing = true with objective dpo: not supported "
            "(each pair's chosen and rejected rows are padded); set data.packing: false"
        )
    keep = cfg.data.max_prompt_tokens
    if keep is not None and keep >= cfg.data.seq_len:
        raise ConfigError(
            f"{where('data.max_prompt_tokens')}: data.max_prompt_tokens = {keep} leaves no room for "
            f"the completions in data.seq_len = {cfg.data.seq_len}"
        )


def _check_paths(cfg, where: Where) -> None:
    """The local files the config names exist."""
    if cfg.training.eval_generate and (cfg.data.eval_path is None or cfg.model.path is None):
        raise ConfigError(
            f"{where('training.eval_generate')}: training.eval_generate needs data.eval_path (the "
            "prompts and expected answers) and model.path (the base the adapter is loaded on)"
        )
    _check_data_files(cfg.data, where)
    tok = cfg.data.tokenizer
    if tok is not None and not Path(tok).is_dir() and not names.is_named_model(tok):
        raise ConfigError(f"{where('data.tokenizer')}: data.tokenizer = '{cfg.data.tokenizer}': directory not found")
    ds = cfg.backend.deepspeed_config
    if ds is not None and not Path(ds).is_file():
        raise ConfigError(f"{where('backend.deepspeed_config')}: backend.deepspeed_config = '{ds}': file not found")


def _mix_keys(data) -> set[str]:
    """Keys a data.mix entry may set: the data section's own, per dataset, plus path and weight."""
    from dataclasses import fields

    return {"path", "weight"} | {f.name for f in fields(type(data))} - {
        "mix",
        "eval_path",
        "eval_fraction",
        "cache_dir",
        "seq_len",
        "packing",
        "tokenizer",
        "num_proc",
        "prepare_timeout_s",
    }


def _check_data_files(data, where: Where) -> None:
    """data.path (or every data.mix entry's path) and data.eval_path name data; mix entries are well formed."""
    if data.mix is None:
        _check_source(data.path, where("data.path"), "data.path")
    if data.mix is not None and not data.mix:
        raise ConfigError(f"{where('data.mix')}: data.mix: empty list (omit it, or list datasets)")
    allowed = _mix_keys(data)
    for i, entry in enumerate(data.mix or []):
        at = f"{where('data.mix')}: data.mix[{i}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{at}: expected a mapping with 'path' (and format, weight, ...)")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ConfigError(f"{at}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
        w = entry.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
            raise ConfigError(f"{at}.weight = {w!r}: must be a number > 0")
        _check_source(str(entry["path"]), where("data.mix"), f"data.mix[{i}].path")
    if data.eval_path is not None:
        _check_source(data.eval_path, where("data.eval_path"), "data.eval_path")


def _check_source(path: str, source: str, key: str) -> None:
    """One file (no heavy import: the common case), else a glob, a directory or a Hub dataset."""
    if Path(path).is_file():
        return
    from dtrain.data import locate

    try:
        locate.check(path, key)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
