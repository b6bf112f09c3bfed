"""Per-GPU training memory by category, for full fine-tuning and for LoRA, by arithmetic only.

``estimate(spec, plan)`` is pure and never allocates the model; the ``ModelSpec`` it reads comes
from ``dtrain.memory.model_spec``.

The assumptions are `ASSUMPTIONS` below (printed with every estimate); their derivations and
references are docs/memory_estimate.md's. Not counted: CUDA context, allocator fragmentation,
communication buckets, optimizer-step transients, prefetch of a second unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from dtrain.config.schema import TrainingConfig
from dtrain.errors import ConfigError
from dtrain.lora import targets as presets
from dtrain.memory import shards
from dtrain.memory.activations import (  # noqa: F401  (estimate.layer_activation_bytes for its users)
    activation_bytes,
    layer_activation_bytes,
    loss_transient_bytes,
)
from dtrain.memory.model_spec import LinearModule, ModelSpec, moe_targets

GIB = 2**30
BACKENDS = ("fsdp", "deepspeed")
BITS = (16, 8, 4)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION = ("sdpa", "eager")
ALL_LINEAR = "all-linear"
NF4_BLOCK = 64
CATEGORIES = (
    "frozen_weights",
    "trainable_params",
    "gradients",
    "optimizer_state",
    "gathered_unit",
    "activations",
    "loss_logits",
)
CHECKPOINTING = (False, True, "attention")

ASSUMPTIONS = (
    "sharded states (params, grads, optimizer, frozen weights) divided by N = gpus * nodes",
    "full FT: AdamW, 16-bit param 2 B + grad 2 B + fp32 master/m/v 12 B = 16 B/param "
    "(fp32: 4+4+8); fp32_grads: 18 B/param",
    "LoRA: r*(in+out) fp32 params per target, 4 B param + 4 B grad + 8 B Adam = 16 B/param",
    "frozen: 16-bit 2 B/param; 8-bit 1 B + fp32 scale per row; 4-bit NF4 0.5 B + fp32 absmax "
    "per 64; embeddings, head, norms, biases unquantized",
    "gathered unit: fsdp = largest of decoder block / embeddings / head / root rest; deepspeed = largest module",
    "activations: Korthikanti et al. 2022 per layer (GQA, gated MLP), s^2 scores only for "
    "eager attention; checkpointing keeps layer inputs + one layer; loss: fp32 log-softmax "
    "b*s*V*4, or with the chunked loss (default for LoRA) the hidden-state gradient b*s*h",
    "LoRA model states per tensor as each backend cuts it: FSDP2 ceil(dim0/N) rows, ZeRO-3 "
    "ceil(numel/N) elements; plus AdamW's 4-byte step tensors",
    "loss logits (transient): the micro-batch's logits, or one chunk's, in the compute dtype plus an fp32 copy",
    "not counted: CUDA context, fragmentation, comm buckets, optimizer-step transients",
)


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
    target_parameters: tuple[str, ...] = ()  # lora.target_parameters: fused expert / router weights
    batch: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool | str = False
    param_dtype: str = "bf16"
    fp32_grads: bool = False
    attention: str = "sdpa"
    checkpoint_every: int = 1
    chunked_loss: bool | str = "auto"
    loss_chunk: int = field(default_factory=lambda: TrainingConfig().loss_chunk_tokens)  # 0: by vocabulary

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", parse_targets(self.targets))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "target_parameters", tuple(self.target_parameters or ()))
        for name in ("gpus", "nodes", "rank", "batch", "seq_len", "checkpoint_every", "loss_chunk"):
            value = getattr(self, name)  # loss_chunk 0: the chunk sized from the vocabulary
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "loss_chunk"):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("bits", self.bits, BITS)
        _check_choice("param_dtype", self.param_dtype, tuple(DTYPE_BYTES))
        _check_choice("attention", self.attention, ATTENTION)
        if self.grad_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"grad_checkpointing must be one of false, true, attention, got {self.grad_checkpointing!r}"
            )
        if self.chunked_loss not in (True, False, "auto"):
            raise ConfigError(f"chunked_loss must be true, false or auto, got {self.chunked_loss!r}")
        if (not self.targets and not self.target_parameters) or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets must name at least one module, got {self.targets!r}")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    def chunked(self, mode: str) -> bool:
        """Whether the loss is chunked for ``mode`` (lora / full): ``auto`` is LoRA only, as
        training's ``training.chunked_loss: auto``."""
        return self.chunked_loss is True or (self.chunked_loss == "auto" and mode == "lora")

    @property
    def grad_bytes(self) -> int:
        return 4 if self.fp32_grads else self.param_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["targets"] = list(self.targets)
        out["target_parameters"] = list(self.target_parameters)
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
    loss_logits: float = 0.0

    @property
    def model_states(self) -> float:
        """The sharded, persistent part: frozen + trainable + gradients + optimizer."""
        return self.frozen_weights + self.trainable_params + self.gradients + self.optimizer_state

    @property
    def total(self) -> float:
        return self.model_states + self.gathered_unit + self.activations + self.loss_logits

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
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``; ``"all-linear"`` stays one item."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ConfigError(f"targets must name at least one module, got {text!r}")
    return targets


# ----------------------------------------------------------------------------- arithmetic


def targeted_linears(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[LinearModule, ...]:
    """Block linears matched by ``targets`` (suffixes, ``all-linear``: every block linear, or a
    preset of dtrain.lora.targets: attention-qv, attention, mlp, resolved from the linears' names)."""
    dense = tuple(lin for lin in spec.linears if not lin.fused)
    if ALL_LINEAR in targets:
        return dense
    if len(targets) == 1 and targets[0] in ("experts", "all"):  # dtrain.lora.experts' presets
        return moe_targets(spec, targets[0])
    if len(targets) == 1 and presets.is_preset(targets[0]):
        chosen = set(presets.resolve_names([lin.name for lin in spec.linears], targets[0]))
        return tuple(lin for lin in spec.linears if lin.name in chosen)
    missing = [t for t in targets if not any(lin.matches(t) for lin in spec.linears)]
    if missing:
        names = ", ".join(sorted({lin.name.rsplit(".", 1)[-1] for lin in spec.linears}))
        raise ConfigError(
            f"LoRA targets {', '.join(missing)} match no linear layer of {spec.name} (its linears: {names})"
        )
    return tuple(lin for lin in spec.linears if any(lin.matches(t) for t in targets))


def targeted_parameters(spec: ModelSpec, names: tuple[str, ...]) -> tuple[LinearModule, ...]:
    """Fused expert weights and router weights matched by lora.target_parameters (suffixes of the
    path inside a block: mlp.experts.gate_up_proj, mlp.gate.weight), as dtrain.lora.experts does."""
    have = tuple(lin for lin in spec.linears if lin.fused) + spec.routers
    missing = [t for t in names if not any(lin.matches(t) for lin in have)]
    if missing:
        kinds = ", ".join(sorted(lin.name for lin in have)) or "none"
        raise ConfigError(
            f"lora.target_parameters {', '.join(missing)} match no fused expert weight or router weight "
            f"of {spec.name} (it has: {kinds})"
        )
    return tuple(lin for lin in have if any(lin.matches(t) for t in names))


def lora_param_count(targets: tuple[LinearModule, ...], rank: int) -> int:
    """Trainable LoRA parameters: A (r x in) + B (out x r) per targeted layer."""
    return sum(rank * (lin.in_features + lin.out_features) * lin.count for lin in targets)


def quantized_weight_bytes(lin: LinearModule, bits: int, param_bytes: int) -> int:
    """Bytes of one layer's frozen weight (not its bias) stored at ``bits``.

    8: int8 + one fp32 scale per output row; 4: packed NF4 (two per byte) + one fp32 absmax
    per ``NF4_BLOCK`` weights; 16: the parameter dtype. A fused expert weight counts per expert, as
    dtrain/model/expert_quant.py stores it (each expert quantized on its own [out, in]).
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
        gathered_unit=pb * max(unit_params(spec, plan.backend), ds_live_params(spec, plan))
        + pb * unit_params(spec, plan.backend),  # gathered parameters + one unit's gradients
        activations=activation_bytes(spec, plan, chunked=plan.chunked("full")),
        loss_logits=loss_transient_bytes(spec, plan, plan.chunked("full")),
    )


def ds_live_params(spec: ModelSpec, plan: Plan) -> int:
    """Parameters ZeRO-3 may keep gathered for their reuse in backward: dtrain's generated
    `stage3_max_live_parameters` (one rank's share of the model; 0 on one rank or with FSDP)."""
    if plan.backend != "deepspeed":
        return 0
    from dtrain.backends.zero3_sizing import ModelSize, gather_limits

    limits = gather_limits(ModelSize(hidden=spec.hidden_size, params=spec.total_params), plan.world_size)
    return limits["stage3_max_live_parameters"]


def _lora_unit_bytes(spec: ModelSpec, plan: Plan, targets: tuple[LinearModule, ...]) -> float:
    """Gathered unit for LoRA: frozen storage + fp32 adapter params and grads (8 B) of the
    unit, plus one dequantized weight of the largest linear when quantized. FSDP2 gathers padded
    shards: an A of r rows on N > r ranks gathers N rows (r * ceil(r / N) of them real)."""
    pb = plan.param_bytes
    n = plan.world_size if plan.backend == "fsdp" else 1
    rows = math.ceil(plan.rank / n) * n
    lora = {lin: rows * lin.in_features + plan.rank * math.ceil(lin.out_features / n) * n for lin in targets}

    def layer_bytes(lin: LinearModule) -> float:
        bias = (lin.out_features if lin.bias else 0) * pb
        return quantized_weight_bytes(lin, plan.bits, pb) + bias + 8 * lora.get(lin, 0)

    if plan.backend == "deepspeed":
        biggest = max((layer_bytes(lin) for lin in spec.linears), default=0)
        kept = ds_live_params(spec, plan) * frozen_bytes(spec, plan.bits, pb) / spec.total_params
        unit = max(spec.largest_other_module_params * pb, biggest, kept)
    else:
        linears = sum(lin.count * layer_bytes(lin) for lin in spec.linears) / spec.num_layers
        linear_params = sum(lin.count * lin.params for lin in spec.linears) / spec.num_layers
        block = linears + (spec.block_params - linear_params) * pb
        unit = max(block, fsdp_outer_unit_params(spec) * pb)
    largest_weight = max((lin.weight_params for lin in spec.linears), default=0)
    return unit + (largest_weight * pb if plan.bits < 16 else 0)


def lora_breakdown(spec: ModelSpec, plan: Plan, targets: tuple[LinearModule, ...]) -> Breakdown:
    """LoRA: frozen (maybe quantized) base sharded over N; fp32 adapters with fp32 AdamW; each
    tensor cut as the backend cuts it (dtrain/memory/shards.py), rank 0's share."""
    states = shards.lora_model_states(
        spec, targets, plan.rank, plan.bits, plan.param_bytes, plan.world_size, plan.backend
    )
    return Breakdown(
        **states,
        gathered_unit=_lora_unit_bytes(spec, plan, targets),
        activations=activation_bytes(spec, plan, targets, chunked=plan.chunked("lora")),
        loss_logits=loss_transient_bytes(spec, plan, plan.chunked("lora")),
    )


def estimate(spec: ModelSpec, plan: Plan) -> Estimate:
    """Per-GPU memory by category for full fine-tuning and for LoRA (pure arithmetic)."""
    targets = targeted_linears(spec, plan.targets) if plan.targets else ()
    targets += tuple(lin for lin in targeted_parameters(spec, plan.target_parameters) if lin not in targets)
    return Estimate(
        spec=spec,
        plan=plan,
        lora_targets=targets,
        lora_params=lora_param_count(targets, plan.rank),
        full=full_ft_breakdown(spec, plan),
        lora=lora_breakdown(spec, plan, targets),
    )
