"""What the memory estimate knows about a model: parameter counts and shapes, no tensors.

``spec_from_config`` turns a Hugging Face config dict into a ``ModelSpec`` by building the model
on the meta device (exact shapes, no storage: well under a second for 70B or 175B) or, when
transformers cannot build it, by Llama-style arithmetic on the config fields
(``spec_from_llama_arithmetic``). ``PRESETS`` holds the configs of the models ``dtrain estimate``
knows by name. The byte arithmetic on a spec is in ``dtrain.memory.estimate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dtrain.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a model is built, not when the CLI starts
    from torch import nn

# Config keys that would make transformers quantize or load remote code; irrelevant to shapes.
_IGNORED_KEYS = frozenset({"quantization_config", "auto_map"})

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B (LLaMA-1 7B has the same shapes): 6,738,415,616 parameters.
    "llama-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # Llama-2-70B (grouped-query attention, 8 KV heads): 68,976,648,192 parameters.
    "llama-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # GPT-3 175B (Brown et al. 2020) as an OPT config: OPT is GPT-3's architecture (pre-LN,
    # learned positions, 4*d GeLU MLP, biases, tied embeddings) with separate q/k/v
    # projections, so LoRA can target q_proj,v_proj as the LoRA paper did. OPT keeps two
    # extra position rows (+24,576 parameters): 174,604,283,904 parameters.
    "gpt3-175b": {
        "model_type": "opt",
        "hidden_size": 12288,
        "ffn_dim": 49152,
        "num_hidden_layers": 96,
        "num_attention_heads": 96,
        "vocab_size": 50257,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 12288,
        "activation_function": "gelu",
        "do_layer_norm_before": True,
        "tie_word_embeddings": True,
    },
}


@dataclass(frozen=True)
class LinearModule:
    """Linear layers of one shape inside the decoder blocks.

    ``name`` is the path inside a block (``self_attn.q_proj``); ``count`` is how many such
    layers the model has (usually ``num_layers``).
    """

    name: str
    in_features: int
    out_features: int
    count: int
    bias: bool = False
    fused: bool = False  # one expert of a fused 3-D expert weight (count: layers x experts)

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)

    def matches(self, target: str) -> bool:
        """PEFT-style suffix match: the name equals ``target`` or ends with ``.target``."""
        return self.name == target or self.name.endswith("." + target)


@dataclass(frozen=True)
class ModelSpec:
    """Parameter counts and shapes of a decoder-only causal LM (no tensors).

    ``linears`` lists only the linears inside decoder blocks (the LoRA targets and the
    quantized layers); the output head is ``head_params`` (0 when tied to the embeddings).
    ``largest_other_module_params`` is the largest module outside the block linears, counting
    only its own parameters (usually the embedding or the head).
    """

    name: str
    total_params: int
    embedding_params: int
    head_params: int
    linears: tuple[LinearModule, ...]
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool
    block_params: int
    non_block_params: int
    largest_other_module_params: int
    source: str = "meta"
    expert_params: int = 0  # parameters in fused expert weights (mixture of experts)
    active_params: int = 0  # parameters a token uses: total less the experts it is not routed to
    # (shape, how many) of every parameter outside the block linears (embeddings, head, norms):
    # the per-tensor sharding arithmetic of dtrain/memory/shards.py needs the shapes, not just sizes.
    other_shapes: tuple[tuple[tuple[int, ...], int], ...] = ()
    # MoE routers (not linear layers: their [E, H] weights are in other_shapes), as LoRA targets
    # of lora.target_parameters (`mlp.gate.weight`: A [r, H], B [E, r]; dtrain/lora/router.py)
    routers: tuple[LinearModule, ...] = ()

    def __post_init__(self) -> None:
        if not self.active_params:
            object.__setattr__(self, "active_params", self.total_params)

    @property
    def largest_module_params(self) -> int:
        """Largest module by its own parameters: DeepSpeed's ``largest_layer_params``."""
        biggest_linear = max((lin.params for lin in self.linears), default=0)
        return max(self.largest_other_module_params, biggest_linear)

    def summary(self) -> dict[str, Any]:
        """Plain data for JSON output (linears as dicts)."""
        out = asdict(self)
        out["linears"] = [asdict(lin) for lin in self.linears]
        out["largest_module_params"] = self.largest_module_params
        return out


def spec_from_config(cfg: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """ModelSpec of a HF causal-LM config dict (with ``model_type``).

    Exact: the model is built on the meta device and its modules enumerated. If transformers
    cannot build it (unknown ``model_type``, custom code), Llama-style arithmetic is used
    (``source="arithmetic"``) when the config has the Llama size fields.
    """
    if not isinstance(cfg, Mapping) or not cfg.get("model_type"):
        raise ConfigError(f"{name}: the model config needs a 'model_type' (e.g. llama)")
    try:
        hf_cfg, model = _meta_build(cfg)
    except Exception as err:  # noqa: BLE001 - any build failure falls back to arithmetic
        if _is_llama_like(cfg):
            return spec_from_llama_arithmetic(cfg, name)
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{name}: transformers cannot build model_type {cfg['model_type']!r} ({reason})") from err
    dims = _dims(lambda key: getattr(hf_cfg, key, None), name)
    return _spec_from_model(model, dims, name)


def _meta_build(cfg: Mapping[str, Any]) -> tuple[Any, nn.Module]:
    """(HF config, model on the meta device: shapes only, no storage), built by the same
    `model.build_empty` as training (tied embeddings tied the same way)."""
    import torch
    from transformers import AutoConfig

    from dtrain.model import build as model_lib

    kwargs = {k: v for k, v in cfg.items() if k not in _IGNORED_KEYS}
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return hf_cfg, model_lib.build_empty(hf_cfg, torch.float32)


def _dims(get: Callable[[str], Any], name: str) -> dict[str, Any]:
    """Sizes the activation formula needs, from a config getter (dict.get or getattr)."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if not get(k)]
    if missing:
        raise ConfigError(f"{name}: the model config lacks {', '.join(missing)}")
    h, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    ffn = next((get(k) for k in ("intermediate_size", "ffn_dim", "n_inner") if get(k)), 4 * h)
    return {
        "num_layers": int(get("num_hidden_layers")),
        "hidden_size": h,
        "num_heads": heads,
        "num_kv_heads": int(get("num_key_value_heads") or heads),
        "head_dim": int(get("head_dim") or h // heads),
        "intermediate_size": int(ffn),
        "vocab_size": int(get("vocab_size")),
    }


def _is_llama_like(cfg: Mapping[str, Any]) -> bool:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return all(isinstance(cfg.get(k), int) and cfg.get(k) > 0 for k in keys)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, has_bias) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight is in x out)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out), getattr(module, "bias", None) is not None
    return None


def _decoder_blocks(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The model's decoder blocks (layers.decoder_blocks), which must be the config's num_layers."""
    from dtrain.model import layers

    blocks = layers.decoder_blocks(model)
    if len(blocks) != num_layers:
        raise ConfigError(
            f"cannot find the {num_layers} decoder blocks of {type(model).__name__} "
            f"(found {len(blocks)} modules of its _no_split_modules)"
        )
    return blocks


def _block_linears(blocks: list[nn.Module]) -> tuple[tuple[LinearModule, ...], set[int]]:
    """Linear layers of the blocks grouped by (path in block, shape), and their module ids."""
    counts: dict[tuple[str, int, int, bool], int] = {}
    ids: set[int] = set()
    for block in blocks:
        for path, module in block.named_modules():
            shape = _linear_shape(module)
            if shape is not None:
                ids.add(id(module))
                counts[(path, *shape)] = counts.get((path, *shape), 0) + 1
    linears = tuple(LinearModule(p, i, o, c, b) for (p, i, o, b), c in counts.items())
    return linears + _fused_experts(blocks), ids


def _fused_experts(blocks: list[nn.Module]) -> tuple[LinearModule, ...]:
    """Fused expert weights ([E, out, in], or [E, in, out] when the module says `is_transposed`) as
    E linears each (what expert LoRA adapts: r * E * (in + out) parameters per weight)."""
    counts: dict[tuple[str, int, int], int] = {}
    for block in blocks:
        for path, module in block.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    e, d1, d2 = p.shape
                    fan_in, fan_out = (d1, d2) if getattr(module, "is_transposed", False) else (d2, d1)
                    key = (f"{path}.{pname}" if path else pname, int(fan_in), int(fan_out))
                    counts[key] = counts.get(key, 0) + int(e)
    return tuple(LinearModule(n, i, o, c, fused=True) for (n, i, o), c in counts.items())


def _routers(blocks: list[nn.Module]) -> tuple[LinearModule, ...]:
    """The blocks' MoE router weights [E, H] as linears H -> E, named `<path>.weight`."""
    from dtrain.lora.router import is_router

    counts: dict[tuple[str, int, int], int] = {}
    for block in blocks:
        for path, module in block.named_modules():
            if is_router(module):
                e, h = module.weight.shape
                counts[(f"{path}.weight", int(h), int(e))] = counts.get((f"{path}.weight", int(h), int(e)), 0) + 1
    return tuple(LinearModule(n, i, o, c) for (n, i, o), c in counts.items())


def _active_params(model: nn.Module, total: int) -> tuple[int, int]:
    """(parameters in fused expert weights, parameters a token uses: each MoE layer's top-k of E)."""
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    if not experts or not k:
        return experts, total
    unused = sum(p.numel() * (1 - k / p.shape[0]) for p in model.parameters() if p.dim() == 3)
    return experts, total - round(unused)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _spec_from_model(model: nn.Module, dims: dict[str, Any], name: str) -> ModelSpec:
    """Count a (meta) model's parameters; shared parameters are counted once."""
    params = {id(p): p.numel() for p in model.parameters()}
    blocks = _decoder_blocks(model, dims["num_layers"])
    linears, linear_ids = _block_linears(blocks)
    from torch import nn

    emb = {
        id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    from dtrain.model import layers

    head = layers.output_head(model)
    head_own = {id(p): p.numel() for p in head.parameters()} if head is not None else {}
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(params.values())
    others = (_own_params(m) for m in model.modules() if id(m) not in linear_ids)
    in_linears = {id(p) for m in model.modules() if id(m) in linear_ids for p in m.parameters()}
    other_shapes = _shape_counts(
        p.shape for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_linears and p.dim() != 3
    )  # 3-D: fused experts, in `linears`
    return ModelSpec(
        name=name,
        total_params=total,
        embedding_params=sum(emb.values()),
        head_params=sum(n for i, n in head_own.items() if i not in emb),
        linears=linears,
        tied_embeddings=head is not None and id(head.weight) in emb,
        gated_mlp=any(lin.matches("gate_proj") for lin in linears),
        block_params=max(block_sizes),
        non_block_params=total - sum(block_sizes),
        largest_other_module_params=max(others, default=0),
        source="meta",
        expert_params=_active_params(model, total)[0],
        active_params=_active_params(model, total)[1],
        other_shapes=other_shapes,
        routers=_routers(blocks),
        **dims,
    )


def _shape_counts(shapes: Any) -> tuple[tuple[tuple[int, ...], int], ...]:
    """((shape, count), ...) sorted, from an iterable of shapes."""
    counts: dict[tuple[int, ...], int] = {}
    for shape in shapes:
        key = tuple(int(d) for d in shape)
        counts[key] = counts.get(key, 0) + 1
    return tuple(sorted(counts.items()))


def spec_from_llama_arithmetic(cfg: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """Llama / Mistral / Qwen2-style spec from config fields alone (no transformers).

    q, k, v, o, gate, up, down per block plus two RMSNorm weights; final norm; embeddings;
    untied head unless ``tie_word_embeddings``. Qwen2 has q/k/v biases.
    """
    d = _dims(cfg.get, name)
    h, f, layers, vocab = d["hidden_size"], d["intermediate_size"], d["num_layers"], d["vocab_size"]
    dq, dkv = d["num_heads"] * d["head_dim"], d["num_kv_heads"] * d["head_dim"]
    qkv_bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    o_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    linears = (
        LinearModule("self_attn.q_proj", h, dq, layers, qkv_bias),
        LinearModule("self_attn.k_proj", h, dkv, layers, qkv_bias),
        LinearModule("self_attn.v_proj", h, dkv, layers, qkv_bias),
        LinearModule("self_attn.o_proj", dq, h, layers, o_bias),
        LinearModule("mlp.gate_proj", h, f, layers, mlp_bias),
        LinearModule("mlp.up_proj", h, f, layers, mlp_bias),
        LinearModule("mlp.down_proj", f, h, layers, mlp_bias),
    )
    block = sum(lin.params for lin in linears) + 2 * h
    tied = bool(cfg.get("tie_word_embeddings", False))
    non_block = vocab * h * (1 if tied else 2) + h
    return ModelSpec(
        name=name,
        total_params=layers * block + non_block,
        embedding_params=vocab * h,
        head_params=0 if tied else vocab * h,
        linears=linears,
        tied_embeddings=tied,
        gated_mlp=True,
        block_params=block,
        non_block_params=non_block,
        largest_other_module_params=vocab * h,
        source="arithmetic",
        other_shapes=_shape_counts([(vocab, h)] * (1 if tied else 2) + [(h,)] * (2 * layers + 1)),
        **d,
    )


def moe_targets(spec: ModelSpec, preset: str) -> tuple[LinearModule, ...]:
    """The linears of lora.targets `experts` (the fused experts, else linears under `.experts.`)
    or `all` (those and every other block linear but the router), as dtrain.lora.experts.resolve."""
    dense = tuple(lin for lin in spec.linears if not lin.fused)
    chosen = tuple(lin for lin in spec.linears if lin.fused) or tuple(lin for lin in dense if ".experts." in lin.name)
    if not chosen and preset == "experts":
        raise ConfigError(f"LoRA targets experts: {spec.name} has no experts")
    if preset == "experts":
        return chosen
    routers = tuple(lin for lin in dense if lin.name.rsplit(".", 1)[-1] in ("gate", "router"))
    return chosen + tuple(lin for lin in dense if lin not in chosen and lin not in routers)
