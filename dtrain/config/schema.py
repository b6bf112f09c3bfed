"""Typed config schema, loaded from YAML with `key.sub=value` overrides.

Every field has a default and a one-line description (the `help` metadata). `load()` turns bad
input into one `ConfigError` line naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dtrain.config.types import OverrideValue as _OverrideValue, check as _check, closest as _closest
from dtrain.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    path: str | None = _f(
        None,
        "local directory of a Hugging Face causal LM (safetensors), a Hub ID "
        "org/name[@revision] (HF cache), or a built-in model's name (smollm2-135m-instruct)",
    )
    arch: dict | None = _f(None, "inline HF config (model_type, sizes) for a random-weight model")
    dtype: Literal["fp32", "bf16"] = _f("fp32", "dtype of the frozen base weights and compute")
    gradient_checkpointing: bool | Literal["attention"] = _f(
        False,
        "recompute activations in backward to save memory: true (whole decoder blocks) or "
        "attention (only each block's attention)",
    )
    gradient_checkpointing_every: int = _f(1, "checkpoint every N-th decoder block (blocks 0, N, 2N, ...)", min=1)
    compile_blocks: bool = _f(False, "torch.compile each decoder block (needs a C++ compiler on CPU)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = _f(
        "sdpa",
        "attention kernel; flash_attention_2/3 (packed rows as varlen sequences) and flex_attention "
        "need CUDA and their package",
    )
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")


@dataclass
class LoraConfig:
    r: int = _f(8, "rank of the update B A", min=1)
    alpha: float = _f(16.0, "scaling numerator: the update is (alpha / r) B A", gt=0)
    dropout: float = _f(0.0, "dropout on the LoRA input path, in [0, 1)", lo=0.0, hi_open=1.0)
    targets: list[str] | str = _f(
        ["q_proj", "v_proj"],
        "suffixes; presets: attention-qv, attention, mlp, all-linear, experts, all (all-linear + experts)",
    )
    target_regex: str | None = _f(None, "regex on full module names; replaces `targets` when set")
    target_parameters: list[str] | None = _f(
        None,
        "fused 3-D expert weights and MoE router weights by name suffix, as PEFT's "
        "(e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight]); "
        "added to the targets ([] for these only)",
    )
    adapter_name: str = _f("default", "name of the adapter being trained")
    init_seed: int = _f(0, "seed for the random init of A (B starts at zero)")
    use_rslora: bool = _f(False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r")
    use_dora: bool = _f(False, "DoRA: learn a magnitude per output row (docs/lora_variants.md)")
    loraplus_lr_ratio: float | None = _f(
        None, "LoRA+: B (and DoRA's magnitude) train at lr x this ratio; null: one lr for all", gt=0
    )
    init_from: str | None = _f(None, "start from this adapter directory (dtrain's or PEFT's; same r and targets)")


@dataclass
class DataConfig:
    path: str = _f(
        "dtrain/assets/tiny_corpus.txt",
        "a jsonl/json/csv/parquet/txt file, a glob or directory of "
        "such shards, a save_to_disk directory, or a Hub dataset org/name",
    )
    format: Literal["text", "instruction", "messages", "sharegpt", "alpaca", "preference"] = _f(
        "text",
        "text (packed stream), instruction (prompt/response), messages, sharegpt, alpaca, or "
        "preference (prompt/chosen/rejected, objective: dpo)",
    )
    text_field: str = _f("text", "field holding the text (format: text, non-txt files)")
    prompt_field: str = _f("prompt", "field holding the prompt (format: instruction, preference)")
    response_field: str = _f("response", "field holding the response (format: instruction)")
    chosen_field: str = _f("chosen", "field holding the preferred completion (format: preference)")
    rejected_field: str = _f("rejected", "field holding the dispreferred completion (format: preference)")
    messages_field: str | None = _f(None, "field holding the turns; null: messages / conversations")
    turn_keys: list[str] | None = _f(None, "[role key, text key] of a turn; null: [role, content] / [from, value]")
    role_map: dict | None = _f(None, "dataset role -> system/user/assistant, over the format's defaults")
    alpaca_fields: list[str] = _f(
        ["instruction", "input", "output"], "alpaca: instruction, input, output fields", length=3
    )
    subset: str | None = _f(None, "Hub dataset: its configuration (subset) name; null: the default one")
    split: str = _f("train", "split of a Hub dataset or of a save_to_disk DatasetDict")
    chat_template: str | None = _f(None, "Jinja chat template (or a .jinja file); null: the tokenizer's")
    tokenizer: str | None = _f(None, "local tokenizer directory or Hub ID; default: model.path, else built-in")
    seq_len: int = _f(128, "tokens per training sequence", min=2)
    truncation: Literal["drop", "truncate", "error"] = _f(
        "drop", "examples over seq_len: drop, keep their last seq_len tokens, or fail"
    )
    max_prompt_tokens: int | None = _f(
        None, "format preference: prompt tokens kept (its end); null: what data.seq_len leaves", min=1
    )
    packing: bool = _f(False, "several examples per row, best fit (attention never crosses examples)")
    group_by_length: bool = _f(False, "micro-batches of similar lengths (less padding), still seeded and resumable")
    mix: list[dict] | None = _f(None, "several datasets: [{path, format, weight, <data keys>}]; replaces path")
    eval_path: str | None = _f(None, "evaluation file (same format); eval_fraction is then unused")
    eval_fraction: float = _f(0.1, "fraction of examples held out for evaluation", lo=0.0, hi_open=1.0)
    bad_records: Literal["skip", "error"] = _f("skip", "missing/empty fields: skip and count, or fail")
    num_proc: int | None = _f(
        None, "processes tokenizing on rank 0 (batched, in shards); null: the cores it may use", min=1
    )
    prepare_timeout_s: int = _f(
        14400,
        "seconds the other ranks wait for rank 0 to tokenize (not backend.timeout_s: a first tokenization may be long)",
        min=1,
    )
    cache_dir: str | None = _f(None, "token cache directory; null: $DTRAIN_CACHE/tokens (~/.cache/dtrain)")


@dataclass
class TrainingConfig:
    seed: int = _f(1234, "seed for data order, dropout and init")
    lr: float = _f(3e-4, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", lo=0.0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", length=2, lo=0.0, hi_open=1.0)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = _f(10, "linear warmup steps", lo=0)
    min_lr_ratio: float = _f(0.1, "cosine decays to lr * min_lr_ratio", lo=0.0)
    max_steps: int = _f(100, "optimizer steps; 0 means run `epochs` epochs", lo=0)
    epochs: int = _f(1, "epochs, used when max_steps is 0", min=1)
    micro_batch_size: int = _f(4, "sequences per rank per forward", min=1)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", min=1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables", lo=0.0)
    eval_every: int = _f(50, "evaluate every N steps; 0 disables", lo=0)
    eval_batches: int = _f(8, "micro-batches per evaluation", min=1)
    eval_generate: int = _f(0, "after the last step: exact match on the first N prompts of data.eval_path", lo=0)
    log_every: int = _f(1, "write metrics every N steps", min=1)
    memory_every: int = _f(0, "log memory every N steps; 0 disables", lo=0)
    save_every: int = _f(0, "training checkpoint every N steps; 0: only at the end", lo=0)
    keep_last: int = _f(2, "training checkpoints kept", min=1)
    resume: Literal["auto", "never"] = _f("never", "auto: continue from the newest checkpoint")
    time_limit: str | int | None = _f(
        None,
        "wall time of this job (90m, 2h, 01:30:00; a number: seconds): "
        "checkpoint and exit 75 before it ends, as under SLURM's own end "
        "time; null: none",
    )
    nonfinite: Literal["skip", "stop"] = _f(
        "skip", "a step with a non-finite loss or gradient norm: skip it (no update, counted) or stop the run"
    )
    nonfinite_max: int = _f(3, "stop after this many non-finite steps in a row (nonfinite: skip)", min=1)
    chunked_loss: bool | Literal["auto"] = _f(
        "auto",
        "loss from the hidden states in chunks of tokens, never all logits at once; "
        "auto: on for LoRA with a plain linear head",
    )
    loss_chunk_tokens: int = _f(
        0, "tokens per chunk of the chunked loss; 0: from the vocabulary (one chunk's fp32 logits within 256 MiB)", lo=0
    )


@dataclass
class DpoConfig:
    beta: float = _f(0.1, "DPO's beta: how far the policy may move from the reference", gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = _f("sigmoid", "sigmoid (DPO), ipo or hinge")
    label_smoothing: float = _f(
        0.0, "conservative DPO: the probability that a label is flipped (sigmoid)", lo=0.0, hi_open=0.5
    )
    reference: str = _f("base", "base (the adapter switched off) or adapter:DIR (a frozen earlier adapter)")


@dataclass
class BackendConfig:
    name: Literal["none", "fsdp", "deepspeed"] = _f("none", "sharding backend")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available, else cpu")
    dist_backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto: nccl on cuda, gloo on cpu")
    deepspeed_config: str | None = _f(None, "user DeepSpeed JSON merged over the generated one")
    timeout_s: int = _f(
        1800,
        "seconds a collective may wait for the other ranks before the job fails "
        "(process-group timeout: raise it for long saves or evaluations)",
        min=1,
    )


@dataclass
class QuantizationConfig:
    bits: Literal[16, 8, 4] = _f(16, "frozen base weights: 16 (as dtype), 8 (int8) or 4 (NF4)")
    include_head: bool = _f(False, "also quantize the output head")


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "run directory: config, metrics, checkpoints, adapter")
    overwrite: bool = _f(False, "replace an earlier run in output.dir (its files are removed first)")


LoggerName = Literal["jsonl", "tensorboard", "mlflow", "wandb"]


@dataclass
class LoggingConfig:
    backends: list[LoggerName] | LoggerName = _f(["jsonl"], "loggers: jsonl (always on), tensorboard, mlflow, wandb")
    project: str = _f("dtrain", "experiment / project name (mlflow, wandb)")
    run_name: str | None = _f(None, "run name (mlflow, wandb); null: output.dir's last part")
    mlflow_uri: str | None = _f(None, "MLflow tracking URI; null: a file store in <output.dir>/mlruns")
    wandb_mode: Literal["offline", "online"] = _f("offline", "wandb: offline writes <output.dir>/wandb only")
    peak_tflops: float | None = _f(None, "peak dense TFLOP/s of one GPU for MFU; null: known GPUs only", gt=0)
    loss_curve: bool = _f(True, "write <output.dir>/loss_curve.png at the end of the run")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mode: Literal["lora", "full"] = field(
        default="lora", metadata={"help": "lora: train A and B only; full: train every weight"}
    )
    objective: Literal["sft", "dpo"] = field(
        default="sft", metadata={"help": "sft: next-token loss; dpo: preference pairs (data.format: preference)"}
    )
    dpo: DpoConfig = field(default_factory=DpoConfig)


def from_dict(raw: dict, source: str) -> Config:
    """A Config from already-read YAML values, type-checked by the schema (unknown keys, types and
    ranges give the usual one-line errors naming `source`), without the cross-field checks."""
    return _build(Config, raw, "", _Where(source, {}))


def load(path: str | Path | None, overrides: list[str] = (), resolve: Callable[[Config], None] | None = None) -> Config:
    """Read a YAML config (or defaults when path is None), apply overrides, validate. `resolve`
    (dtrain/model/sources.py's, for the commands that run a model) turns named models into their
    directories before the checks; config/ itself never downloads or imports a model."""
    source = str(path) if path else "<defaults>"
    raw: dict = read_yaml(Path(path)) if path is not None else {}
    cli: dict[str, str] = {}  # dotted key -> the override that set it: errors name the override
    for item in overrides:
        cli[_apply_override(raw, item)] = item
    where = _Where(source, cli)
    cfg = _build(Config, raw, "", where)
    from dtrain.config import checks as config_checks, paths

    paths.resolve_config(cfg, Path(path).resolve().parent if path is not None else None)
    if resolve is not None:
        resolve(cfg)
    config_checks.validate(cfg, where)
    return cfg


def read_yaml(p: Path) -> dict:
    """The raw mapping of a YAML config file (yaml.safe_load); every reader of dtrain's YAML uses it."""
    source = str(p)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    return raw


class _Where:
    """Where a key's value came from, for error messages: the config file, or an override."""

    def __init__(self, source: str, cli: dict[str, str]) -> None:
        self.source, self.cli = source, cli

    def __call__(self, key: str) -> str:
        """The override that set `key` (or a section above it, or else a key below it), else the file."""
        for match in (lambda k: k == key, lambda k: key.startswith(k + "."), lambda k: k.startswith(key + ".")):
            found = [item for k, item in self.cli.items() if match(k)]
            if found:
                return f"override '{found[-1]}'"
        return self.source


_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _apply_override(raw: dict, item: str) -> str:
    """Set `key.sub=value` in `raw`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key.sub=value (e.g. lora.r=16)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(_KEY_PART.fullmatch(p) for p in parts):
        raise ConfigError(
            f"override '{item}': '{key}' is not a key: expected dot-separated names "
            "before '=' (e.g. lora.r=16); `dtrain config` lists the keys"
        )
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a section")
    node[parts[-1]] = _OverrideValue(value)
    return key.strip()


def _build(cls: type, raw: Any, prefix: str, where: _Where) -> Any:
    key = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        shown = str(raw) if isinstance(raw, _OverrideValue) else repr(raw)
        raise ConfigError(
            f"{where(key)}: {key} = {shown}: {key} is a section, not a value; set its keys "
            f"({key}.<key>=...; keys: {keys})"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in fields:
            close = _closest(str(k), list(fields))
            hint = f"; did you mean '{prefix}{close}'?" if close else ""
            allowed = ", ".join(fields)
            raise ConfigError(f"{where(prefix + str(k))}: unknown key '{prefix}{k}'{hint} (allowed: {allowed})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        t = hints[name]
        if dataclasses.is_dataclass(t):
            values[name] = _build(t, raw[name], f"{prefix}{name}.", where)
        else:
            values[name] = _check(raw[name], t, f, f"{prefix}{name}", where(f"{prefix}{name}"))
    return cls(**values)


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (written to the run directory). A model resolved from the
    Hugging Face cache is written as `org/name@commit`: the run records the exact revision, and the
    file loads again on any machine whose cache holds (or can download) it."""
    from dtrain.config.names import display

    out = dataclasses.asdict(cfg)
    out["model"]["path"] = display(cfg.model.path)
    out["data"]["tokenizer"] = display(cfg.data.tokenizer)
    return out


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or the new)."""
    from dtrain.storage import files

    files.write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_schema() -> list[tuple[str, str, str]]:
    """(key, default, description) rows for every field, for the README and `dtrain config`."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, json.dumps(default), f.metadata.get("help", "")))

    walk(Config, "")
    return rows
