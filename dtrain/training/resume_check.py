"""What a resumed run must agree on with the checkpoint it continues (see docs/resume.md).

A training checkpoint records the settings that define the model and the run (trainer_state.json,
"settings"); `check` compares them with this run's and refuses every change, one line each naming
the key, the checkpoint's value and this config's, before anything is loaded (else: a size
mismatch deep inside a backend, or worse, a run that silently continues at another scale).

Must match: the LoRA shape, scale and variant (r, alpha, rsLoRA, DoRA, the LoRA+ ratio), which
parameters exist (targets, target_regex, adapter_name, target parameters where the schema has
them), the base (model.path, the architecture, a content hash of config.json + weight index),
model.dtype, the quantization, the tokenizer (hash of its vocabulary) and chat template (hash), the
objective where the schema has one, the data settings that decide the examples (files, format,
fields, seq_len, truncation, packing, the held-out split, the seed) and the global batch
(micro_batch_size x grad_accum x ranks: the batch plan, and so the data position of a step).
May change: lora.dropout (regularization only; one log line says so), the backend and the number
of ranks (the optimizer state is stored unsharded and resharded on load), the lr schedule keys
(the saved scheduler state wins). Checkpoints written before a key was recorded skip that key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dtrain.config.schema import Config
from dtrain.errors import ConfigError
from dtrain.model import fingerprint, hub

log = logging.getLogger(__name__)
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
_LORA = "LoRA settings"
# key -> what the refusal asks to keep the same (config keys are read from the config; the others
# are computed in `settings`)
MUST_MATCH = {
    "mode": "mode",
    "lora.r": _LORA,
    "lora.alpha": _LORA,
    "lora.use_rslora": _LORA,
    "lora.use_dora": _LORA,
    "lora.loraplus_lr_ratio": _LORA,
    "lora.targets": _LORA,
    "lora.target_regex": _LORA,
    "lora.adapter_name": _LORA,
    "lora.target_parameters": _LORA,
    "model.path": "model",
    "model.base_hash": "model",
    "model.dtype": "model",
    "quantization.bits": "quantization",
    "quantization.include_head": "quantization",
    "tokenizer.hash": "tokenizer",
    "data.chat_template_hash": "chat template",
    "objective": "objective",
    "training.objective": "objective",
    "dpo.reference": "DPO reference",
    "data.path": "data",
    "data.mix": "data",
    "data.format": "data",
    "data.seq_len": "data",
    "data.truncation": "data",
    "data.packing": "data",
    "data.eval_path": "data",
    "data.eval_fraction": "data",
    "data.bad_records": "data",
    "data.fields": "data",
    "training.seed": "data order",
}
_COMPUTED = {"model.base_hash", "tokenizer.hash", "data.chat_template_hash", "data.fields", "lora.targets"}
# the record fields each data format reads: a change of another format's field changes nothing
FORMAT_FIELDS = {
    "text": ("text_field",),
    "instruction": ("prompt_field", "response_field"),
    "messages": ("messages_field", "turn_keys", "role_map"),
    "sharegpt": ("messages_field", "turn_keys", "role_map"),
    "alpaca": ("alpaca_fields",),
}
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")
_MISSING = object()


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def settings(cfg: Config, model, tokenizer=None) -> dict:
    """The settings a checkpoint records (plain data, JSON-able). Keys the schema lacks (e.g. an
    objective) are left out; the tokenizer's hashes only when the caller has the tokenizer."""
    lc, d, arch = cfg.lora, cfg.data, getattr(model, "config", None)
    out = {k: v for k in MUST_MATCH if k not in _COMPUTED and (v := _get(cfg, k)) is not _MISSING}
    out.update(
        {
            "lora.targets": lc.targets if isinstance(lc.targets, str) else sorted(lc.targets),
            "lora.alpha": float(lc.alpha),
            "lora.dropout": float(lc.dropout),
            "data.eval_fraction": float(d.eval_fraction),
            "data.fields": {f: getattr(d, f) for f in FORMAT_FIELDS.get(d.format, ())},
            "model.arch": {k: getattr(arch, k, None) for k in ARCH_KEYS} if arch is not None else {},
            "model.base_hash": fingerprint.base(cfg.model.path),
        }
    )
    if "model.path" in out:  # a Hub model as org/name@commit: another commit is another model
        out["model.path"] = hub.display(cfg.model.path)
    if "dpo.reference" in out and out.get("objective") != "dpo":
        out["dpo.reference"] = None  # only DPO reads it
    if tokenizer is not None:
        from dtrain.data import chat

        out["tokenizer.hash"] = fingerprint.tokenizer(tokenizer)
        if d.format in CHAT_FORMATS:  # plain text never renders a template
            out["data.chat_template_hash"] = fingerprint.text(chat.template_of(d, tokenizer))
    return json.loads(json.dumps(out))  # tuples -> lists, as the saved side reads back


def _show(v) -> str:
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def _line(path: Path, what: str, saved, now, keep: str) -> str:
    return (
        f"training.resume=auto: the checkpoint in {path} was trained with {what} = {_show(saved)}, "
        f"this config has {what} = {_show(now)}; resume with the same {keep} or start a new output.dir"
    )


def mismatches(state: dict, now: dict, path: Path) -> list[str]:
    """One line per setting the checkpoint recorded that differs from `now` (this run's settings)."""
    saved, lines = state.get("settings") or {}, []
    for key, keep in MUST_MATCH.items():
        if key in saved and key in now and saved[key] != now[key]:
            lines.append(_line(path, key, saved[key], now[key], keep))
    for key, value in (saved.get("model.arch") or {}).items():
        if now["model.arch"].get(key) != value:
            lines.append(_line(path, f"model {key}", value, now["model.arch"].get(key), "model"))
    return lines


def check(state: dict, cfg: Config, model, plan, path: Path, tokenizer=None) -> None:
    """Refuse (ConfigError, one line per mismatch) a resume whose settings differ from the checkpoint's."""
    if int(state.get("format", 1)) < 2:
        raise ConfigError(
            f"training.resume=auto: the checkpoint in {path} was written by an older dtrain "
            "(checkpoint format 1, per-rank optimizer shards); finish it with that version "
            "or start a new output.dir"
        )
    saved, now = state.get("settings") or {}, settings(cfg, model, tokenizer)
    lines = mismatches(state, now, path)
    if lines:
        raise ConfigError("\n".join(lines))
    if "lora.dropout" in saved and saved["lora.dropout"] != now["lora.dropout"]:
        log.warning(
            "resume: lora.dropout %s -> %s (allowed: it changes only the regularization from here on)",
            saved["lora.dropout"],
            now["lora.dropout"],
        )
    _check_batch(state.get("data") or {}, plan, path)


def _check_batch(data: dict, plan, path: Path) -> None:
    if plan is None or not data:
        return
    if data.get("global_batch") != plan.global_batch:
        was = (
            f"{data.get('micro_batch')} x {data.get('grad_accum')} x {data.get('world')} rank(s)"
            if "world" in data
            else "?"
        )
        raise ConfigError(
            f"training.resume=auto: the checkpoint in {path} was trained with a global batch of "
            f"{data.get('global_batch')} sequences (training.micro_batch_size x training.grad_accum x ranks = "
            f"{was}), this run's is {plan.global_batch} ({plan.micro_batch} x {plan.grad_accum} x "
            f"{plan.world} rank(s)); keep the product equal (e.g. half the ranks, twice the micro-batch) "
            "or start a new output.dir"
        )
    if data.get("group_by_length", False) != (plan.lengths is not None):
        log.warning(
            "resume: data.group_by_length was %s in %s, is %s now: batches after the resume differ "
            "from an uninterrupted run's",
            data.get("group_by_length", False),
            path.name,
            plan.lengths is not None,
        )
    if (data.get("n_examples"), data.get("seed")) != (plan.n_examples, plan.seed):
        log.warning(
            "resume: the data differs from %s's (%d examples, seed %s; now %d, seed %s): batches "
            "after the resume differ from an uninterrupted run's",
            path.name,
            data.get("n_examples", -1),
            data.get("seed"),
            plan.n_examples,
            plan.seed,
        )
