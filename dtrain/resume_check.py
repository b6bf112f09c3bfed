"""What a resumed run must agree on with the checkpoint it continues (see docs/resume.md).

A training checkpoint records the settings that decide the shapes and the meaning of what it
holds (trainer_state.json, "settings"); `check` compares them with this run's and refuses a change
in ONE line naming the key, before anything is loaded (else: a size mismatch, a KeyError on a
parameter name or an optimizer-group mismatch deep inside a backend).

Must match: lora.r (shapes), lora.alpha (the scale alpha / r of the loaded B A), lora.targets /
lora.target_regex (which parameters exist), lora.adapter_name (their names), model.path and the
model's architecture, quantization.bits and quantization.include_head (the frozen base the adapter
was trained against), mode, and the global batch (micro_batch_size x grad_accum x ranks: the batch
plan, and so the data position of a step, depends on it). May change: lora.dropout (regularization
only; one log line says so), the backend and the number of ranks (the optimizer state is stored
unsharded and resharded on load), model.dtype, lr schedule keys (the saved scheduler state wins).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dtrain.config import Config
from dtrain.errors import ConfigError

log = logging.getLogger(__name__)
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings")
# key -> what the refusal asks to keep the same
MUST_MATCH = {"mode": "mode", "lora.r": "LoRA settings", "lora.alpha": "LoRA settings",
              "lora.targets": "LoRA settings", "lora.target_regex": "LoRA settings",
              "lora.adapter_name": "LoRA settings", "model.path": "model",
              "quantization.bits": "quantization", "quantization.include_head": "quantization",
              "objective": "objective", "dpo.reference": "DPO reference"}


def settings(cfg: Config, model) -> dict:
    """The settings a checkpoint records (plain data, JSON-able)."""
    lc, targets = cfg.lora, cfg.lora.targets
    arch = getattr(model, "config", None)
    return {
        "mode": cfg.mode, "lora.r": lc.r, "lora.alpha": float(lc.alpha),
        "lora.targets": targets if isinstance(targets, str) else sorted(targets),
        "lora.target_regex": lc.target_regex, "lora.adapter_name": lc.adapter_name,
        "lora.dropout": float(lc.dropout), "model.path": cfg.model.path,
        "model.arch": {k: getattr(arch, k, None) for k in ARCH_KEYS} if arch is not None else {},
        "quantization.bits": cfg.quantization.bits, "quantization.include_head": cfg.quantization.include_head,
        "objective": cfg.objective, "dpo.reference": cfg.dpo.reference if cfg.objective == "dpo" else None,
    }


def _show(v) -> str:
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return "null" if v is None else str(v)


def _refuse(path: Path, what: str, saved: str, now: str, keep: str) -> ConfigError:
    return ConfigError(f"training.resume=auto: the checkpoint in {path} was trained with {what} = {saved}, "
                       f"this config has {what} = {now}; resume with the same {keep} or start a new output.dir")


def check(state: dict, cfg: Config, model, plan, path: Path) -> None:
    """Refuse (ConfigError, one line) a resume whose settings differ from the checkpoint's."""
    if int(state.get("format", 1)) < 2:
        raise ConfigError(f"training.resume=auto: the checkpoint in {path} was written by an older dtrain "
                          "(checkpoint format 1, per-rank optimizer shards); finish it with that version "
                          "or start a new output.dir")
    saved, now = state.get("settings") or {}, settings(cfg, model)
    for key, keep in MUST_MATCH.items():
        if key in saved and saved[key] != now[key]:
            raise _refuse(path, key, _show(saved[key]), _show(now[key]), keep)
    for key, value in (saved.get("model.arch") or {}).items():
        if now["model.arch"].get(key) != value:
            raise _refuse(path, f"model {key}", _show(value), _show(now["model.arch"].get(key)), "model")
    if "lora.dropout" in saved and saved["lora.dropout"] != now["lora.dropout"]:
        log.warning("resume: lora.dropout %s -> %s (allowed: it changes only the regularization from here on)",
                    saved["lora.dropout"], now["lora.dropout"])
    _check_batch(state.get("data") or {}, plan, path)


def _check_batch(data: dict, plan, path: Path) -> None:
    if plan is None or not data:
        return
    if data.get("global_batch") != plan.global_batch:
        was = (f"{data.get('micro_batch')} x {data.get('grad_accum')} x {data.get('world')} rank(s)"
               if "world" in data else "?")
        raise ConfigError(
            f"training.resume=auto: the checkpoint in {path} was trained with a global batch of "
            f"{data.get('global_batch')} sequences (training.micro_batch_size x training.grad_accum x ranks = "
            f"{was}), this run's is {plan.global_batch} ({plan.micro_batch} x {plan.grad_accum} x "
            f"{plan.world} rank(s)); keep the product equal (e.g. half the ranks, twice the micro-batch) "
            "or start a new output.dir")
    if data.get("group_by_length", False) != (plan.lengths is not None):
        log.warning("resume: data.group_by_length was %s in %s, is %s now: batches after the resume differ "
                    "from an uninterrupted run's", data.get("group_by_length", False), path.name,
                    plan.lengths is not None)
    if (data.get("n_examples"), data.get("seed")) != (plan.n_examples, plan.seed):
        log.warning("resume: the data differs from %s's (%d examples, seed %s; now %d, seed %s): batches "
                    "after the resume differ from an uninterrupted run's", path.name, data.get("n_examples", -1),
                    data.get("seed"), plan.n_examples, plan.seed)
