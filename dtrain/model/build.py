"""Build a Hugging Face causal LM without materializing it, and fill its weights from a source.

A model is built empty (on the meta device, or under a backend's sharding context), then every
parameter is filled from a `WeightSource`: a local safetensors checkpoint (read tensor by tensor,
rows by rows, so a rank reads only its shard) or a name-seeded random init for inline-config
models. The LoRA parameters come from their own init. No code here knows about ranks.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from dtrain.config.schema import ModelConfig
from dtrain.errors import ConfigError
from dtrain.lora.layer import LoRALinear
from dtrain.lora.ops import is_lora_param
from dtrain.model import expert_quant, expert_weights as expert_checkpoint, layers
from dtrain.model.hf import (  # noqa: F401
    check_causal_lm,
    checkpoint_renamings,
    custom_model_type,
    fit_attention,
    renamed_keys,  # model.restore_buffers for the backends
    restore_buffers,
)
from dtrain.model.layers import checkpoint_key
from dtrain.model.shapes import logical_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The architecture config: from model.path's config.json, or model.arch inline."""
    if cfg.path is not None:
        if not (Path(cfg.path) / "config.json").is_file():
            raise ConfigError(f"model.path = '{cfg.path}': no config.json in that directory")
        try:
            config = AutoConfig.from_pretrained(
                cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
            )
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for a bad file
            custom = custom_model_type(Path(cfg.path))
            if custom and not cfg.trust_remote_code:
                raise ConfigError(
                    f"model.path = '{cfg.path}': {custom} is custom code (auto_map in its config.json), "
                    "which dtrain runs only with model.trust_remote_code=true"
                ) from None
            raise ConfigError(f"model.path = '{cfg.path}': config.json: {_first_line(e)}") from None
    else:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except Exception as e:  # noqa: BLE001 - ValueError, KeyError, huggingface_hub's validation errors
            raise ConfigError(f"model.arch: {_first_line(e)}") from None
    # the kernel every attention layer calls (from_config reads it from the config); packed rows reach
    # flash attention as varlen sequences through their position_ids, sdpa and eager as a block mask
    config._attn_implementation = getattr(cfg, "attn_implementation", "sdpa")
    fit_attention(config, cfg.trust_remote_code)
    return config


def _first_line(e: Exception) -> str:
    """The gist of a transformers error: its first informative line, without the list of every
    model type it knows."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[-1] if lines and lines[0].rstrip().endswith(":") else (lines[0] if lines else type(e).__name__)
    text = re.sub(r"^\w+(Error|Exception): ", "", text)
    return text.split(". Should contain one of")[0][:300]


def import_model_code(config: PretrainedConfig, trust_remote_code: bool = False) -> None:
    """Import every module that building `config`'s model imports, before any sharding context.

    transformers imports model code and its own machinery lazily, on first use. A build inside
    `deepspeed.zero.Init` (which patches `torch.Tensor.__new__`) must not be that first use:
    importing `torch._dynamo` there fails on the patched signature (transformers 5.24 pulls it in
    from `modeling_utils`). So the build's imports all happen here, outside; tests check that a
    ZeRO-3 build imports nothing new.
    """
    import torch._dynamo  # noqa: F401  (its polyfills check Tensor.__new__ at import)
    import transformers.modeling_utils  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        import transformers.initialization  # noqa: F401  (no_init_weights, transformers >= 5)
    except ImportError:
        pass
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the architecture's modeling module
    elif trust_remote_code:  # custom code: one throwaway build on meta imports all it needs
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=True)


def build_empty(
    config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device = "meta", trust_remote_code: bool = False
) -> nn.Module:
    """The model's modules with uninitialized (meta by default) parameters, tied as the config says."""
    check_causal_lm(config, trust_remote_code)
    fit_attention(config, trust_remote_code)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a config value the architecture cannot use
        raise ConfigError(
            f"model: transformers cannot build a {config.model_type} model from this config "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if layers.output_head(model) is None:
        raise ConfigError(
            f"model: {config.model_type}: {type(model).__name__} names no output head "
            "(get_output_embeddings() gives none); dtrain needs it to keep the head out of LoRA "
            "and quantization and to tie it"
        )
    tie_embeddings(model)
    return model


def ties_embeddings(model: nn.Module) -> bool:
    """Whether the config asks for the output head to be the input embedding matrix."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def tie_embeddings(model: nn.Module) -> None:
    """Make head and input embeddings one parameter when the config ties them, and check it.

    Done explicitly: whether `from_config` ties depends on the transformers release and on the
    context (5.24 leaves them untied under `no_init_weights`). Afterwards the tied weight is one
    tensor: counted once, sharded once, read once from the checkpoint (under the embedding's name).
    """
    if not ties_embeddings(model):
        return
    embed, head = layers.input_embeddings(model), layers.output_head(model)
    if embed is None or head is None:
        return
    if head.weight is not embed.weight:
        head.weight = embed.weight
    if layers.output_head(model).weight is not layers.input_embeddings(model).weight:
        raise ConfigError("model: tie_word_embeddings is set but the head could not be tied to the embeddings")


class WeightSource(Protocol):
    """Gives the full value, or a range of rows, of a parameter by its model name."""

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor: ...


class SafetensorsSource:
    """A local HF checkpoint: one `model.safetensors` or shards with `model.safetensors.index.json`."""

    def __init__(self, path: str | Path, prefix: str = "", renamings: list | None = None) -> None:
        """`prefix`: the model's `base_model_prefix` ("model", "bert"), which checkpoints saved
        from the base model alone (`BertModel`, not `BertLMHeadModel`) store their keys without.
        `renamings`: transformers' renamings of checkpoint keys to module names for this model
        (`checkpoint_renamings`: GPT-NeoX's stored `embed_out` is the module `lm_head`)."""
        self.path, self.prefix = Path(path), prefix
        names, index = layers.weight_files(self.path, "model.path")
        if index is not None:
            self.files = {k: self.path / v for k, v in index["weight_map"].items()}
        else:
            f = self.path / names[0]
            with _safe_open(f) as h:
                self.files = {k: f for k in h.keys()}
        self._open: dict[Path, object] = {}
        self.renamed = renamed_keys(sorted(self.files), renamings or [])

    def key(self, name: str) -> str | None:
        """The checkpoint key holding model parameter `name`: as stored, without the prefix, or
        stored under the name transformers renames to `name`."""
        key = checkpoint_key(name)
        bare = key[len(self.prefix) + 1 :] if self.prefix and key.startswith(self.prefix + ".") else None
        for candidate in (key, bare, *expert_checkpoint.stored_names(key)):
            if candidate in self.files:
                return candidate
            if candidate in self.renamed:
                return self.renamed[candidate]
        return None

    def has(self, name: str) -> bool:
        return self.key(name) is not None or expert_checkpoint.stored_per_expert(self, checkpoint_key(name)) is not None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        key = self.key(name)
        if key is None and (experts := expert_checkpoint.stored_per_expert(self, checkpoint_key(name))):
            return expert_checkpoint.stack(self, experts, rows)
        if key is None:
            raise ConfigError(f"model.path = '{self.path}': checkpoint has no tensor '{checkpoint_key(name)}'")
        f = self.files[key]
        if f not in self._open:
            # One file open at a time: a handle keeps its mmap, and every page read through it
            # counts in this process's RSS until it is closed (a whole checkpoint's worth by the
            # end of a fill, when all shards stay open). Fills read in module order, so files
            # are rarely reopened.
            self._open.clear()
            self._open[f] = _safe_open(f)
        handle = self._open[f]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows]


def _safe_open(f: Path):
    """safe_open, with a truncated or malformed file reported in one line."""
    try:
        return safe_open(f, "pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise ConfigError(
            f"model.path: '{f}' is not a readable safetensors file (truncated or corrupted?): {_first_line(e)}"
        ) from None


class RandomSource:
    """A name-seeded random init (normal(0, std) for matrices, ones for norms, zeros for biases).

    The same name always gives the same tensor, so every backend builds the same model.
    """

    def __init__(self, seed: int, std: float, shapes: dict[str, torch.Size]) -> None:
        self.seed, self.std, self.shapes = seed, std, shapes

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        key = checkpoint_key(name)
        shape = self.shapes[name]
        if key.endswith(".bias"):
            full = torch.zeros(shape)
        elif "norm" in key or len(shape) == 1:
            full = torch.ones(shape)
        else:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
            full = torch.randn(shape, generator=g) * self.std
        return full if rows is None else full[rows]


class LoraInitSource:
    """Initial values of LoRA A and B, from the LoRA layers themselves."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        layer_name, kind, adapter, _ = name.rsplit(".", 3)
        full = self.layers[layer_name].initial_value(kind, adapter)
        return full if rows is None else full[rows]


class ModelSource:
    """The base weights from `base`, the LoRA weights from their init, casting to the target dtype.

    A variant's state that depends on the base weight (DoRA's magnitude `weight` and frozen
    `base_norm`, both the row norms of the weight the layer computes with) is computed by the
    variant from `base`, for the requested rows only where the storage is row-wise, so a rank
    reads only its own rows (LoraVariant.initial_state).
    """

    def __init__(self, base: WeightSource, model: nn.Module) -> None:
        self.base, self.lora = base, LoraInitSource(model)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if not is_lora_param(name):
            return self.base.read(name, rows)
        layer_name, kind, adapter, leaf = name.rsplit(".", 3)
        if kind in ("lora_A", "lora_B"):
            return self.lora.read(name, rows)
        layer = self.lora.layers[layer_name]

        def weight(r: slice | None) -> torch.Tensor:
            return self.base.read(f"{layer_name}.base_layer.weight", r)

        return layer.lora_variant[adapter].initial_state(layer, adapter, leaf, weight, rows)


class QuantSource:
    """Quantized storage computed from the float weight, one tensor at a time, while loading.

    Row r of int8 storage depends on row r of the weight only, but NF4 blocks run across rows,
    so the full float tensor of one layer is read and quantized, then the requested rows returned.
    """

    def __init__(self, base: WeightSource, model: nn.Module) -> None:
        self.base = base
        self.bits = {n: m.bits for n, m in model.named_modules() if layers.is_quantized(m)}
        self.transposed = {n for n, m in model.named_modules() if getattr(m, "stored_transposed", False)}
        self.experts = expert_quant.storage_map(model)
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._expert_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name in self.experts:
            return self._read_experts(name, rows)
        module, _, leaf = name.rpartition(".")
        if module not in self.bits or leaf not in quant_storage_names():
            return self.base.read(name, rows)
        if self._cache is None or self._cache[0] != module:
            from dtrain.model.quant import quantize_rows

            w = self.base.read(f"{module}.weight").float()
            w = w.t().contiguous() if module in self.transposed else w  # a Conv1D's [in, out] weight
            self._cache = (module, quantize_rows(w, self.bits[module]))
        full = self._cache[1][leaf]
        return full if rows is None else full[rows]

    def _read_experts(self, name: str, rows: slice | None) -> torch.Tensor:
        """Storage or scales of quantized expert weights: only the experts in `rows` are read and
        quantized (each expert's storage depends on that expert's weight only)."""
        float_name, which, meta = self.experts[name]
        key = (float_name, None if rows is None else (rows.start, rows.stop))
        if self._expert_cache is None or self._expert_cache[0] != key:
            self._expert_cache = (key, expert_quant.quantize_stack(self.base.read(float_name, rows), meta))
        return self._expert_cache[1][which]


def quant_storage_names() -> tuple[str, ...]:
    from dtrain.model.quant import STORAGE_NAMES

    return STORAGE_NAMES


def base_source(cfg: ModelConfig, model: nn.Module, seed: int) -> WeightSource:
    """Where the frozen base's weights come from: model.path's checkpoint, or a random init;
    quantized on the fly where the model has quantized layers."""
    if cfg.path is not None:
        source: WeightSource = SafetensorsSource(
            cfg.path, getattr(model, "base_model_prefix", ""), checkpoint_renamings(model)
        )
        check_complete(source, model)
    else:
        shapes = {n: logical_shape(p) for n, p in model.named_parameters()}
        for n, m in model.named_modules():
            if layers.is_quantized(m):  # the float weight a quantized layer is made from, as stored
                stored = (
                    (m.in_features, m.out_features)
                    if getattr(m, "stored_transposed", False)
                    else (m.out_features, m.in_features)
                )
                shapes[f"{n}.weight"] = torch.Size(stored)
        shapes.update({f: meta.shape for f, _, meta in expert_quant.storage_map(model).values()})
        std = float(getattr(model.config, "initializer_range", 0.02))
        source = RandomSource(seed, std, shapes)
    quantized = any(layers.is_quantized(m) or expert_quant.quantized(m) for m in model.modules())
    return QuantSource(source, model) if quantized else source


def base_weight_names(model: nn.Module) -> list[str]:
    """The checkpoint tensors the frozen base needs: each parameter once (tied ones under their
    first name), a quantized layer's float `weight` instead of its storage, no LoRA tensors."""
    quantized = {n for n, m in model.named_modules() if layers.is_quantized(m)}
    experts = expert_quant.storage_map(model)
    names: list[str] = []
    for name, _ in model.named_parameters():
        if is_lora_param(name):
            continue
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf in quant_storage_names():
            name = f"{module}.weight"
        name = experts[name][0] if name in experts else name  # a quantized expert weight: its float tensor
        if name not in names:
            names.append(name)
    return names


def check_complete(source: SafetensorsSource, model: nn.Module) -> None:
    """Every base tensor is in the checkpoint; else one line saying what is missing and why."""
    missing = [checkpoint_key(n) for n in base_weight_names(model) if not source.has(n)]
    if not missing:
        return
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    where = f"model.path = '{source.path}': checkpoint has no tensor '{missing[0]}'{more}"
    archs = getattr(model.config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError(
            f"{where}: the checkpoint is a {'/'.join(archs)}, a model without a language-modeling "
            "head, which cannot be trained as a causal LM (dtrain needs a *ForCausalLM checkpoint)"
        )
    raise ConfigError(where)


def fill_full(model: nn.Module, source: WeightSource) -> None:
    """Copy every parameter's full value from `source` (single-process models)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # `to_empty` breaks ties: re-tie so a tied head is read once, as its source
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source.read(name).to(p.dtype))
