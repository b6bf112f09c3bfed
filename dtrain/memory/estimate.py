"""Per-GPU training memory by category, for full fine-tuning and for LoRA, by arithmetic only.

``estimate(spec, plan)`` is pure and never allocates the model. ``spec_from_config`` turns a
Hugging Face config dict into a ``ModelSpec`` by building the model on the meta device (exact
shapes, no storage: well under a second for 70B or 175B) or, when transformers cannot build
it, by Llama-style arithmetic on the config fields.

Assumptions (derivations and references in docs/memory_estimate.md):

* Sharding: FSDP full shard and DeepSpeed ZeRO-3 both shard every parameter, gradient and
  optimizer tensor over all N = gpus * nodes ranks, so sharded bytes are divided by N
  (padding to a multiple of N is ignored).
* Full fine-tuning, mixed precision (bf16 / fp16) AdamW: 2 B 16-bit parameter + 2 B gradient
  + 12 B optimizer state (fp32 master weight, fp32 m, fp32 v) = 16 B per parameter; in fp32:
  4 + 4 + 8 = 16 B. ``fp32_grads`` keeps gradients in fp32 (4 B): 18 B, DeepSpeed's figure.
* LoRA: frozen weights in the parameter dtype, or decoder-block linears quantized: int8 plus
  one fp32 scale per output row, or NF4 (half a byte) plus one fp32 absmax per 64 weights;
  embeddings, head, norms and biases stay in the parameter dtype. Adapters have r*(in+out)
  parameters per target, in fp32, trained by fp32 AdamW: 4 + 4 + 8 = 16 B per parameter.
* Gathered unit (transient, unsharded): FSDP gathers one unit at a time (a unit per decoder
  block, the embeddings and the head each a unit when untied, a root unit holding the rest);
  DeepSpeed gathers module by module (its own estimator's "largest layer"). Full FT holds the unit's 16-bit parameters and gradients;
  LoRA holds the unit's frozen storage, its adapters' fp32 parameters and gradients and,
  when quantized, one dequantized weight of the largest linear.
* Activations (per GPU, ``batch`` is the per-GPU micro-batch): Korthikanti et al. 2022 per
  layer, generalised to GQA and gated MLPs; logits in fp32 (b*s*vocab*4); see
  ``layer_activation_bytes``. LoRA adds its rank-r intermediate per target.
* Not counted: CUDA context, allocator fragmentation, communication buckets, optimizer-step
  transients, prefetch of a second unit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # torch is imported when a model is built, not when the CLI starts
    from torch import nn

GIB = 2**30
BACKENDS = ("fsdp", "deepspeed")
BITS = (16, 8, 4)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION = ("sdpa", "eager")
ALL_LINEAR = "all-linear"
NF4_BLOCK = 64
CATEGORIES = (
    "frozen_weights", "trainable_params", "gradients", "optimizer_state", "gathered_unit",
    "activations",
)
# Config keys that would make transformers quantize or load remote code; irrelevant to shapes.
_IGNORED_KEYS = frozenset({"quantization_config", "auto_map"})

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B (LLaMA-1 7B has the same shapes): 6,738,415,616 parameters.
    "llama-7b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    # Llama-2-70B (grouped-query attention, 8 KV heads): 68,976,648,192 parameters.
    "llama-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    # GPT-3 175B (Brown et al. 2020) as an OPT config: OPT is GPT-3's architecture (pre-LN,
    # learned positions, 4*d GeLU MLP, biases, tied embeddings) with separate q/k/v
    # projections, so LoRA can target q_proj,v_proj as the LoRA paper did. OPT keeps two
    # extra position rows (+24,576 parameters): 174,604,283,904 parameters.
    "gpt3-175b": {
        "model_type": "opt", "hidden_size": 12288, "ffn_dim": 49152, "num_hidden_layers": 96,
        "num_attention_heads": 96, "vocab_size": 50257, "max_position_embeddings": 2048,
        "word_embed_proj_dim": 12288, "activation_function": "gelu",
        "do_layer_norm_before": True, "tie_word_embeddings": True,
    },
}

ASSUMPTIONS = (
    "sharded states (params, grads, optimizer, frozen weights) divided by N = gpus * nodes",
    "full FT: AdamW, 16-bit param 2 B + grad 2 B + fp32 master/m/v 12 B = 16 B/param "
    "(fp32: 4+4+8); fp32_grads: 18 B/param",
    "LoRA: r*(in+out) fp32 params per target, 4 B param + 4 B grad + 8 B Adam = 16 B/param",
    "frozen: 16-bit 2 B/param; 8-bit 1 B + fp32 scale per row; 4-bit NF4 0.5 B + fp32 absmax "
    "per 64; embeddings, head, norms, biases unquantized",
    "gathered unit: fsdp = largest of decoder block / embeddings / head / root rest; deepspeed = largest module",
    "activations: Korthikanti et al. 2022 per layer (GQA, gated MLP), s^2 scores only for "
    "eager attention; checkpointing keeps layer inputs + one layer; logits fp32 b*s*V*4",
    "not counted: CUDA context, fragmentation, comm buckets, optimizer-step transients",
)


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


@dataclass(frozen=True)
class Plan:
    """How the model is trained. ``gpus`` is per node; ``batch`` is the per-GPU micro-batch.

    ``bits`` applies to LoRA's frozen weights only (16 = the parameter dtype). ``fp32_grads``
    keeps gradients in fp32 (DeepSpeed ``data_types.grad_accum_dtype: fp32``, FSDP
    ``reduce_dtype=float32``). ``attention``: ``sdpa`` (flash / memory-efficient kernels, no
    s^2 scores saved) or ``eager``.
    """

    gpus: int = 1
    nodes: int = 1
    backend: str = "fsdp"
    bits: int = 16
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    batch: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool = False
    param_dtype: str = "bf16"
    fp32_grads: bool = False
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", parse_targets(self.targets))
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("gpus", "nodes", "rank", "batch", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("bits", self.bits, BITS)
        _check_choice("param_dtype", self.param_dtype, tuple(DTYPE_BYTES))
        _check_choice("attention", self.attention, ATTENTION)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must name at least one module, got {self.targets!r}")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.fp32_grads else self.param_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["targets"] = list(self.targets)
        out["world_size"] = self.world_size
        return out


@dataclass(frozen=True)
class Breakdown:
    """Bytes on one GPU by category (see ``CATEGORIES``)."""

    frozen_weights: float
    trainable_params: float
    gradients: float
    optimizer_state: float
    gathered_unit: float
    activations: float

    @property
    def model_states(self) -> float:
        """The sharded, persistent part: frozen + trainable + gradients + optimizer."""
        return self.frozen_weights + self.trainable_params + self.gradients + self.optimizer_state

    @property
    def total(self) -> float:
        return self.model_states + self.gathered_unit + self.activations

    def scaled(self, factor: float) -> Breakdown:
        return Breakdown(*(getattr(self, c) * factor for c in CATEGORIES))

    def as_dict(self) -> dict[str, int]:
        """Categories plus ``model_states`` and ``total``, rounded to whole bytes."""
        out = {c: round(getattr(self, c)) for c in CATEGORIES}
        out["model_states"] = round(self.model_states)
        out["total"] = round(self.total)
        return out


@dataclass(frozen=True)
class Estimate:
    """Per-GPU breakdowns for full fine-tuning (``full``) and LoRA (``lora``)."""

    spec: ModelSpec
    plan: Plan
    lora_targets: tuple[LinearModule, ...]
    lora_params: int
    full: Breakdown
    lora: Breakdown

    @property
    def ratio(self) -> float:
        """Per-GPU total, full fine-tuning over LoRA."""
        return self.full.total / self.lora.total

    def cluster(self, mode: str) -> Breakdown:
        """``full`` or ``lora`` summed over all GPUs (per GPU times N)."""
        return getattr(self, mode).scaled(self.plan.world_size)

    def category_ratios(self) -> dict[str, float | None]:
        """Full over LoRA per category, ``model_states`` and ``total``; None where LoRA is 0."""
        keys = CATEGORIES + ("model_states", "total")
        pairs = {k: (getattr(self.full, k), getattr(self.lora, k)) for k in keys}
        return {k: (f / lo if lo else None) for k, (f, lo) in pairs.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, plan, LoRA size, per-GPU and cluster bytes, ratios, assumptions."""
        return {
            "model": self.spec.summary(),
            "plan": self.plan.to_dict(),
            "lora": {
                "targets": sorted({lin.name for lin in self.lora_targets}),
                "trainable_params": self.lora_params,
                "trainable_fraction": self.lora_params / self.spec.total_params,
            },
            "units": "bytes",
            "per_gpu": {"full_ft": self.full.as_dict(), "lora": self.lora.as_dict()},
            "cluster": {
                "full_ft": self.cluster("full").as_dict(),
                "lora": self.cluster("lora").as_dict(),
            },
            "ratio_full_over_lora": self.category_ratios(),
            "assumptions": list(ASSUMPTIONS),
        }


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``; ``"all-linear"`` stays one item."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ValueError(f"targets must name at least one module, got {text!r}")
    return targets


# ----------------------------------------------------------------------------- model specs


def spec_from_config(cfg: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """ModelSpec of a HF causal-LM config dict (with ``model_type``).

    Exact: the model is built on the meta device and its modules enumerated. If transformers
    cannot build it (unknown ``model_type``, custom code), Llama-style arithmetic is used
    (``source="arithmetic"``) when the config has the Llama size fields.
    """
    if not isinstance(cfg, Mapping) or not cfg.get("model_type"):
        raise ValueError(f"{name}: the model config needs a 'model_type' (e.g. llama)")
    try:
        hf_cfg, model = _meta_build(cfg)
    except Exception as err:  # noqa: BLE001 - any build failure falls back to arithmetic
        if _is_llama_like(cfg):
            return spec_from_llama_arithmetic(cfg, name)
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"{name}: transformers cannot build model_type {cfg['model_type']!r} ({reason})"
        ) from err
    dims = _dims(lambda key: getattr(hf_cfg, key, None), name)
    return _spec_from_model(model, dims, name)


def _meta_build(cfg: Mapping[str, Any]) -> tuple[Any, nn.Module]:
    """(HF config, model on the meta device: shapes only, no storage)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k not in _IGNORED_KEYS}
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return hf_cfg, model


def _dims(get: Callable[[str], Any], name: str) -> dict[str, Any]:
    """Sizes the activation formula needs, from a config getter (dict.get or getattr)."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if not get(k)]
    if missing:
        raise ValueError(f"{name}: the model config lacks {', '.join(missing)}")
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
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")
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


def _decoder_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of ``num_layers`` decoder blocks (the largest such list)."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise ValueError(f"cannot find the {num_layers} decoder blocks of {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _block_linears(blocks: nn.ModuleList) -> tuple[tuple[LinearModule, ...], set[int]]:
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
    return linears, ids


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _spec_from_model(model: nn.Module, dims: dict[str, Any], name: str) -> ModelSpec:
    """Count a (meta) model's parameters; shared parameters are counted once."""
    params = {id(p): p.numel() for p in model.parameters()}
    blocks = _decoder_blocks(model, dims["num_layers"])
    linears, linear_ids = _block_linears(blocks)
    from torch import nn

    emb = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
           for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings()
    head_own = {id(p): p.numel() for p in head.parameters()} if head is not None else {}
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(params.values())
    others = (_own_params(m) for m in model.modules() if id(m) not in linear_ids)
    return ModelSpec(
        name=name, total_params=total, embedding_params=sum(emb.values()),
        head_params=sum(n for i, n in head_own.items() if i not in emb), linears=linears,
        tied_embeddings=head is not None and id(head.weight) in emb,
        gated_mlp=any(lin.matches("gate_proj") for lin in linears),
        block_params=max(block_sizes), non_block_params=total - sum(block_sizes),
        largest_other_module_params=max(others, default=0), source="meta", **dims,
    )


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
        name=name, total_params=layers * block + non_block, embedding_params=vocab * h,
        head_params=0 if tied else vocab * h, linears=linears, tied_embeddings=tied,
        gated_mlp=True, block_params=block, non_block_params=non_block,
        largest_other_module_params=vocab * h, source="arithmetic", **d,
    )


# ----------------------------------------------------------------------------- arithmetic


def select_targets(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[LinearModule, ...]:
    """Block linears matched by ``targets`` (suffixes, or ``all-linear``: every block linear)."""
    if ALL_LINEAR in targets:
        return spec.linears
    missing = [t for t in targets if not any(lin.matches(t) for lin in spec.linears)]
    if missing:
        names = ", ".join(sorted({lin.name.rsplit(".", 1)[-1] for lin in spec.linears}))
        raise ValueError(f"LoRA targets {', '.join(missing)} match no linear layer of "
                         f"{spec.name} (its linears: {names})")
    return tuple(lin for lin in spec.linears if any(lin.matches(t) for t in targets))


def lora_param_count(targets: tuple[LinearModule, ...], rank: int) -> int:
    """Trainable LoRA parameters: A (r x in) + B (out x r) per targeted layer."""
    return sum(rank * (lin.in_features + lin.out_features) * lin.count for lin in targets)


def quantized_weight_bytes(lin: LinearModule, bits: int, param_bytes: int) -> int:
    """Bytes of one layer's frozen weight (not its bias) stored at ``bits``.

    8: int8 + one fp32 scale per output row; 4: packed NF4 (two per byte) + one fp32 absmax
    per ``NF4_BLOCK`` weights; 16: the parameter dtype.
    """
    n = lin.weight_params
    if bits == 8:
        return n + 4 * lin.out_features
    if bits == 4:
        return (n + 1) // 2 + 4 * math.ceil(n / NF4_BLOCK)
    return n * param_bytes


def frozen_bytes(spec: ModelSpec, bits: int, param_bytes: int) -> int:
    """Whole-model (unsharded) bytes of LoRA's frozen base: quantized block linears plus the
    rest (embeddings, head, norms, biases) in the parameter dtype."""
    linear = sum(lin.count * quantized_weight_bytes(lin, bits, param_bytes) for lin in spec.linears)
    weights = sum(lin.count * lin.weight_params for lin in spec.linears)
    return linear + (spec.total_params - weights) * param_bytes


def unit_params(spec: ModelSpec, backend: str) -> int:
    """Parameters gathered unsharded at once: one FSDP unit, or one DeepSpeed module."""
    if backend == "deepspeed":
        return spec.largest_module_params
    return fsdp_unit_params(spec)


def fsdp_unit_params(spec: ModelSpec) -> int:
    """Largest of dtrain's FSDP2 units: a decoder block or one of the units outside the blocks."""
    return max(spec.block_params, fsdp_outer_unit_params(spec))


def fsdp_outer_unit_params(spec: ModelSpec) -> int:
    """Largest FSDP2 unit outside the decoder blocks: the embeddings and the head are units of
    their own when untied; the root holds the rest (final norm; tied embeddings stay in it)."""
    if spec.tied_embeddings:
        return spec.non_block_params
    rest = spec.non_block_params - spec.embedding_params - spec.head_params
    return max(spec.embedding_params, spec.head_params, rest)


def layer_activation_bytes(spec: ModelSpec, plan: Plan) -> float:
    """Bytes one decoder layer saves for backward (no recompute), whole micro-batch.

    Korthikanti et al. 2022, ``s*b*h*(34 + 5*a*s/h)`` for GPT with 16-bit activations, split
    into what is saved: 2 LayerNorm inputs (2h), QKV input (h), Q, K, V (dq + 2 dkv), output
    projection input (dq), MLP input (h), MLP hidden (2f: activation in / out; 4f when gated:
    gate, up, act(gate), product), in 16 bits (4 B if fp32), plus two 1-byte dropout masks
    (2h B). Attention scores: eager saves softmax out, its dropout mask and output
    ((2*act_bytes + 1)*a*s B per token); sdpa/flash saves a fp32 logsumexp (4*a B).
    For GPT-3 shapes (dq = dkv = h, f = 4h) this is exactly 34 s*b*h (+ 5 a s^2 b eager).
    """
    act = plan.param_bytes
    h, f, a = spec.hidden_size, spec.intermediate_size, spec.num_heads
    dq, dkv = a * spec.head_dim, spec.num_kv_heads * spec.head_dim
    elements = 2 * h + h + (dq + 2 * dkv) + dq + h + (4 if spec.gated_mlp else 2) * f
    masks = 2 * h
    scores = (2 * act + 1) * a * plan.seq_len if plan.attention == "eager" else 4 * a
    return plan.seq_len * plan.batch * (act * elements + masks + scores)


def activation_bytes(spec: ModelSpec, plan: Plan, lora: tuple[LinearModule, ...] = ()) -> float:
    """Activations on one GPU: all layers (or, with gradient checkpointing, every layer's
    input plus one layer's full set), fp32 logits ``b*s*vocab*4`` and, for LoRA, the saved
    rank-r intermediate ``b*s*r`` per targeted layer."""
    tokens = plan.seq_len * plan.batch
    layer = layer_activation_bytes(spec, plan)
    lora_per_layer = tokens * plan.rank * plan.param_bytes * sum(
        lin.count for lin in lora) / spec.num_layers
    if plan.grad_checkpointing:
        inputs = spec.num_layers * tokens * spec.hidden_size * plan.param_bytes
        layers = inputs + layer + lora_per_layer
    else:
        layers = spec.num_layers * (layer + lora_per_layer)
    return layers + tokens * spec.vocab_size * 4


def optimizer_bytes_per_param(plan: Plan, trained_dtype: str) -> int:
    """AdamW m + v (8 B) plus an fp32 master copy (4 B) when one is kept: for 16-bit trained
    parameters, and always under ZeRO-3, whose optimizer keeps its own fp32 partition even for fp32
    parameters (measured with DeepSpeed 0.19: `dtrain memory` shows 12 B per trainable parameter)."""
    return 12 if plan.backend == "deepspeed" or trained_dtype != "fp32" else 8


def full_ft_breakdown(spec: ModelSpec, plan: Plan) -> Breakdown:
    """Full fine-tuning with AdamW; everything sharded over N except the gathered unit."""
    n, p, pb = plan.world_size, spec.total_params, plan.param_bytes
    return Breakdown(
        frozen_weights=0.0,
        trainable_params=pb * p / n,
        gradients=plan.grad_bytes * p / n,
        optimizer_state=optimizer_bytes_per_param(plan, plan.param_dtype) * p / n,
        gathered_unit=2 * pb * unit_params(spec, plan.backend),
        activations=activation_bytes(spec, plan),
    )


def _lora_unit_bytes(spec: ModelSpec, plan: Plan, targets: tuple[LinearModule, ...]) -> float:
    """Gathered unit for LoRA: frozen storage + fp32 adapter params and grads (8 B) of the
    unit, plus one dequantized weight of the largest linear when quantized."""
    pb = plan.param_bytes
    lora = {lin: plan.rank * (lin.in_features + lin.out_features) for lin in targets}

    def layer_bytes(lin: LinearModule) -> float:
        bias = (lin.out_features if lin.bias else 0) * pb
        return quantized_weight_bytes(lin, plan.bits, pb) + bias + 8 * lora.get(lin, 0)

    if plan.backend == "deepspeed":
        biggest = max((layer_bytes(lin) for lin in spec.linears), default=0)
        unit = max(spec.largest_other_module_params * pb, biggest)
    else:
        linears = sum(lin.count * layer_bytes(lin) for lin in spec.linears) / spec.num_layers
        linear_params = sum(lin.count * lin.params for lin in spec.linears) / spec.num_layers
        block = linears + (spec.block_params - linear_params) * pb
        unit = max(block, fsdp_outer_unit_params(spec) * pb)
    largest_weight = max((lin.weight_params for lin in spec.linears), default=0)
    return unit + (largest_weight * pb if plan.bits < 16 else 0)


def lora_breakdown(spec: ModelSpec, plan: Plan, targets: tuple[LinearModule, ...]) -> Breakdown:
    """LoRA: frozen (maybe quantized) base sharded over N; fp32 adapters with fp32 AdamW."""
    n, trainable = plan.world_size, lora_param_count(targets, plan.rank)
    return Breakdown(
        frozen_weights=frozen_bytes(spec, plan.bits, plan.param_bytes) / n,
        trainable_params=4 * trainable / n,
        gradients=4 * trainable / n,
        optimizer_state=optimizer_bytes_per_param(plan, "fp32") * trainable / n,
        gathered_unit=_lora_unit_bytes(spec, plan, targets),
        activations=activation_bytes(spec, plan, targets),
    )


def estimate(spec: ModelSpec, plan: Plan) -> Estimate:
    """Per-GPU memory by category for full fine-tuning and for LoRA (pure arithmetic)."""
    targets = select_targets(spec, plan.targets)
    return Estimate(
        spec=spec, plan=plan, lora_targets=targets,
        lora_params=lora_param_count(targets, plan.rank),
        full=full_ft_breakdown(spec, plan), lora=lora_breakdown(spec, plan, targets),
    )


# ----------------------------------------------------------------------------- LoRA paper

PAPER_PARAMS = 175e9
PAPER_FULL_BYTES = 1.2e12  # Hu et al. 2021, Sec. 4.2: "from 1.2TB to 350GB"
PAPER_LORA_BYTES = 350e9
PAPER_NOTE = (
    "LoRA agrees: 350 GB is the fp16 frozen weights (2 B x 175e9); the adapters add {adapter}.\n"
    "Full fine-tuning does not: fp16 weights and grads plus fp32 master weights and Adam\n"
    "moments (16 B/param, the ZeRO / DeepSpeed accounting used here) give {full}. The paper's\n"
    "1.2 TB is {paper_bpp:.1f} B/param and the paper does not state its accounting. It cannot\n"
    "hold fp32 Adam moments for every weight (8 B/param alone is 1.40 TB); it lies between\n"
    "fp16 weights + fp16 moments (6 B/param) and fp16 weights, grads and moments (8 B/param).\n"
    "Hence a full/LoRA ratio of {ratio:.1f}x here against the paper's {paper_ratio:.1f}x."
)


def paper_plan() -> Plan:
    """The LoRA paper's GPT-3 setting: fp16, r=4 on W_q and W_v; 64 GPUs (any N gives the
    same cluster model states; N only changes the per-GPU gathered unit and activations)."""
    return Plan(gpus=8, nodes=8, backend="fsdp", bits=16, rank=4, targets=("q_proj", "v_proj"),
                batch=1, seq_len=2048, param_dtype="fp16", grad_checkpointing=True)


def paper_gpt3_comparison() -> dict[str, Any]:
    """GPT-3 175B training memory: the LoRA paper's totals against this estimator's.

    The paper's figures (1.2 TB full fine-tuning, 350 GB LoRA) are cluster totals without
    activations, so they are compared with our model states (per GPU x N). 350 GB is the fp16
    frozen weights (2 B x 175e9). 1.2 TB is 6.9 B/param, below the 16 B/param of fp32-master
    mixed-precision Adam; the paper gives no accounting. See docs/memory_estimate.md.
    """
    spec = spec_from_config(PRESETS["gpt3-175b"], "gpt3-175b")
    est = estimate(spec, paper_plan())
    n, p = est.plan.world_size, spec.total_params
    full, lora = est.full.model_states * n, est.lora.model_states * n
    return {
        "params": p,
        "world_size": n,
        "lora_trainable_params": est.lora_params,
        "adapter_fp16_bytes": 2 * est.lora_params,
        "paper": {
            "full_bytes": PAPER_FULL_BYTES, "lora_bytes": PAPER_LORA_BYTES,
            "ratio": PAPER_FULL_BYTES / PAPER_LORA_BYTES,
            "full_bytes_per_param": PAPER_FULL_BYTES / PAPER_PARAMS,
            "lora_bytes_per_param": PAPER_LORA_BYTES / PAPER_PARAMS,
        },
        "ours": {
            "full_bytes": full, "lora_bytes": lora, "ratio": full / lora,
            "full_bytes_per_param": full / p, "lora_bytes_per_param": lora / p,
            "full_per_gpu_total": est.full.total, "lora_per_gpu_total": est.lora.total,
        },
        "other_accountings": {
            "fp16 weights + fp16 Adam m, v (6 B/param)": 6 * p,
            "fp16 weights, grads, Adam m, v (8 B/param)": 8 * p,
        },
    }


def paper_comparison_markdown(result: dict[str, Any] | None = None) -> str:
    """The comparison as a markdown table (decimal units, as in the paper)."""
    r = result if result is not None else paper_gpt3_comparison()
    pa, us, n = r["paper"], r["ours"], r["world_size"]
    rows = [
        ("LoRA paper, Sec. 4.2 (cluster total)", _tb(pa["full_bytes"]), _gb(pa["lora_bytes"]),
         f"{pa['ratio']:.1f}x"),
        ("paper, bytes per parameter (/ 175e9)", f"{pa['full_bytes_per_param']:.2f}",
         f"{pa['lora_bytes_per_param']:.2f}", ""),
        (f"dtrain model states, per GPU x {n}", _tb(us["full_bytes"]), _gb(us["lora_bytes"]),
         f"{us['ratio']:.1f}x"),
        ("dtrain, bytes per parameter", f"{us['full_bytes_per_param']:.2f}",
         f"{us['lora_bytes_per_param']:.3f}", ""),
        (f"dtrain per-GPU total incl. gathered unit + activations (b=1, s=2048, ckpt), x {n}",
         _tb(us["full_per_gpu_total"] * n), _gb(us["lora_per_gpu_total"] * n), ""),
    ]
    rows += [(name, _tb(v), "", "") for name, v in r["other_accountings"].items()]
    lines = ["| GPT-3 175B | full fine-tuning | LoRA r=4, W_q W_v | full / LoRA |",
             "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append(f"\nParameters: {r['params']:,} (gpt3-175b preset); LoRA trainable: "
                 f"{r['lora_trainable_params']:,} ({_mb(r['adapter_fp16_bytes'])} in fp16).")
    lines.append(PAPER_NOTE.format(
        adapter=_gb(us["lora_bytes"] - r["params"] * 2), full=_tb(us["full_bytes"]),
        paper_bpp=pa["full_bytes_per_param"], ratio=us["ratio"], paper_ratio=pa["ratio"]))
    return "\n".join(lines)


def _tb(x: float) -> str:
    return f"{x / 1e12:.2f} TB"


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"
