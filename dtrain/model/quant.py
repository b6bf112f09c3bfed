"""8-/4-bit frozen weight storage (QuantLinear) kept in plain tensors that shard.

A ``QuantLinear`` holds a frozen linear weight in quantized form, as ordinary
``nn.Parameter(requires_grad=False)`` tensors, so FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3
can shard them along dim 0 like any other parameter:

* ``bits=8``: ``weight_int8`` (int8, ``[out, in]``) and ``weight_scale`` (float32, ``[out]``),
  row-wise absmax quantization (LLM.int8() vector-wise, no outlier split) computed by
  ``bitsandbytes.functional.int8_vectorwise_quant``; ``w ~= weight_int8 * weight_scale[:, None]``
  with ``weight_scale = absmax_row / 127``.
* ``bits=4``: NF4 as in QLoRA, computed by ``bitsandbytes.functional.quantize_4bit``:
  ``weight_nf4`` (uint8, ``[ceil(out*in/2), 1]``, two codes per byte, row-major over the flattened
  weight) and ``weight_absmax`` (float32, ``[ceil(out*in/64)]``, one absmax per block of 64
  consecutive elements). The bitsandbytes ``QuantState`` is rebuilt at each dequantization from
  these two tensors plus the shape kept as Python attributes, so nothing but plain tensors is
  sharded or gathered.

The forward pass dequantizes to the input's dtype and runs ``F.linear``; a custom autograd
function saves only the quantized tensors (not the dequantized weight) and dequantizes again in
backward, so activations memory does not grow by a float copy of every frozen weight. Gradients
flow to the input (and to a bias that requires grad); the quantized weight never gets one.

The storage must be whole (gathered) when ``forward`` or ``dequantized_weight`` runs: FSDP2
all-gathers before a unit's forward and ZeRO-3 before a module's forward; outside forward the
caller gathers (FSDP2 ``unshard()``, ZeRO-3 ``GatheredParameters``), except that a DTensor
parameter is gathered here by ``full_tensor()`` (a collective: call it on every rank).

Error bounds (tests/unit/quant_bounds.py): int8 ``|w - deq(w)| <= scale_row / 2``; NF4 ``<= (max
NF4 code gap / 2) * absmax_block``; plus a few float32 ulps. No distributed code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.model import layers
from dtrain.model.layers import NF4_BLOCKSIZE  # noqa: F401  (quant.NF4_BLOCKSIZE for its users)
from dtrain.model.quant_codes import (  # noqa: F401  (quant.quantize_int8 etc. for their users)
    _BNB_DTYPES,
    SUPPORTED_BITS,
    _check_bits,
    dequantize_int8,
    dequantize_nf4,
    nf4_code,
    quantize_int8,
    quantize_nf4,
    round_trip,
)
from dtrain.model.shapes import logical_numel

# ----------------------------------------------------------------------------- autograd


class _Meta(NamedTuple):
    bits: int
    out_features: int
    in_features: int


def _full(t: Tensor) -> Tensor:
    """The whole tensor: gathers a DTensor (duck-typed, collective), returns others as they are."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _dequantize(q: Tensor, s: Tensor, meta: _Meta, dtype: torch.dtype) -> Tensor:
    """Full ``[out, in]`` weight in ``dtype`` from whole (unsharded) quantized storage."""
    n = meta.out_features * meta.in_features
    expected = n if meta.bits == 8 else (n + 1) // 2
    if q.numel() != expected:
        raise RuntimeError(
            f"QuantLinear storage holds {q.numel()} elements, expected {expected}: it is sharded; "
            "gather it first (FSDP2 unshard(), ZeRO-3 GatheredParameters)"
        )
    if meta.bits == 8:
        return dequantize_int8(q, s, dtype)
    return dequantize_nf4(q, s, (meta.out_features, meta.in_features), dtype)


class _QuantLinearFn(torch.autograd.Function):
    """``F.linear(x, deq(q, s), bias)`` that saves ``q, s`` instead of the float weight."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, s: Tensor, bias: Tensor | None, meta: _Meta) -> Tensor:
        ctx.meta = meta
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(q, s)
        return F.linear(x, _dequantize(q, s, meta, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, s = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(_dequantize(q, s, ctx.meta, grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


# ----------------------------------------------------------------------------- module


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """Frozen linear layer with 8-bit (row-wise int8) or 4-bit (NF4) weight storage.

    Attributes: ``in_features``, ``out_features``, ``bits``, ``compute_dtype`` (the dtype
    ``dequantize()`` returns by default; ``forward`` always computes in the input's dtype). Parameters (all ``requires_grad=False``): for 8 bits
    ``weight_int8``, ``weight_scale``; for 4 bits ``weight_nf4``, ``weight_absmax``; and ``bias``
    (or None). The constructor allocates uninitialised storage (``device="meta"`` works), to be
    filled by ``load_state_dict``; ``from_linear`` / ``from_weight`` quantize a float weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        i8, u8, f32 = torch.int8, torch.uint8, torch.float32
        if bits == 8:
            shape = (out_features, in_features)
            self.weight_int8 = _frozen(torch.empty(shape, dtype=i8, device=device))
            self.weight_scale = _frozen(torch.empty(out_features, dtype=f32, device=device))
        else:
            self.weight_nf4 = _frozen(torch.empty((n + 1) // 2, 1, dtype=u8, device=device))
            blocks = math.ceil(n / NF4_BLOCKSIZE)
            self.weight_absmax = _frozen(torch.empty(blocks, dtype=f32, device=device))
        if bias:
            self.bias = _frozen(torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        bits: int,
        *,
        compute_dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """Quantize a float ``[out, in]`` weight (e.g. one tensor of a checkpoint shard)."""
        _check_bits(bits)
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
        if weight.is_meta:
            raise ValueError("cannot quantize a meta-device weight: load the real weight first")
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            bits,
            bias is not None,
            device="meta",
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            compute_dtype=compute_dtype,
        )
        q, s = quantize_int8(weight) if bits == 8 else quantize_nf4(weight)
        layer._set_storage(q, s)
        if bias is not None:
            layer.bias = _frozen(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, *, compute_dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Quantize an ``nn.Linear`` (its weight and bias are copied, the Linear is untouched)."""
        return cls.from_weight(linear.weight, linear.bias, bits, compute_dtype=compute_dtype)

    def _set_storage(self, q: Tensor, s: Tensor) -> None:
        if self.bits == 8:
            self.weight_int8, self.weight_scale = _frozen(q), _frozen(s)
        else:
            self.weight_nf4, self.weight_absmax = _frozen(q), _frozen(s)

    @property
    def qweight(self) -> Tensor:
        """The integer storage parameter (``weight_int8`` or ``weight_nf4``)."""
        return self.weight_int8 if self.bits == 8 else self.weight_nf4

    @property
    def qscale(self) -> Tensor:
        """The float32 scale parameter (``weight_scale`` or ``weight_absmax``)."""
        return self.weight_scale if self.bits == 8 else self.weight_absmax

    def _meta(self) -> _Meta:
        return _Meta(self.bits, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(x, deq(W).to(x.dtype), bias)``; differentiable w.r.t. ``x`` (and bias)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _QuantLinearFn.apply(x, self.qweight, self.qscale, bias, self._meta())

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Full ``[out, in]`` weight in ``dtype`` (default ``compute_dtype``), no autograd."""
        with torch.no_grad():
            q, s = _full(self.qweight), _full(self.qscale)
            return _dequantize(q, s, self._meta(), dtype or self.compute_dtype)

    def dequantized_weight(self) -> Tensor:
        """Full float32 ``[out, in]`` weight (used by LoRA merge)."""
        return self.dequantize(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, bias={self.bias is not None}"
        )


# ----------------------------------------------------------------------------- model helpers


def _never(name: str) -> bool:  # quantization.include_head: no layer is kept
    return False


def skip_rule(include_head: bool, model: nn.Module | None = None) -> Callable[[str], bool]:
    """The layers kept unquantized (`quantization.include_head`): the head `model` names, or none."""
    if include_head:
        return _never
    heads = layers.head_names(model) if model is not None else set()
    return heads.__contains__ if heads else layers.is_head_name


def _is_float_linear(module: nn.Module) -> bool:
    """A plain float ``nn.Linear`` or Conv1D (not a LoRA wrapper that happens to subclass it)."""
    return (
        (isinstance(module, nn.Linear) or layers.is_conv1d(module))
        and not hasattr(module, "base_layer")
        and module.weight.is_floating_point()
    )


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """Ids of modules inside a LoRA wrapper (a module with ``base_layer``) but not in its base."""
    inside: set[int] = set()
    bases: set[int] = set()
    for m in model.modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, nn.Module):
            inside.update(id(sub) for sub in m.modules() if sub is not m)
            bases.update(id(sub) for sub in base.modules())
    return inside - bases


def quantize_model(model: nn.Module, bits: int, skip: Callable[[str], bool] | None = None) -> int:
    """Replace every float ``nn.Linear`` (and transformers' Conv1D) in ``model`` by a ``QuantLinear``, in place.
    ``skip(name)`` gets the layer's qualified name and keeps the layer when true; default
    ``layers.is_head_name`` (output heads such as ``lm_head``). A LoRA wrapper (any module whose
    ``base_layer`` is an ``nn.Linear``) keeps its place: its ``base_layer`` is replaced, the name
    given to ``skip`` is the wrapper's, and the wrapper's other Linears (adapters such as
    ``lora_A``/``lora_B``) are never quantized. A Linear shared by several parents becomes one
    shared QuantLinear. Returns the number of Linear layers quantized.
    """
    _check_bits(bits)
    skip_fn = layers.is_head_name if skip is None else skip
    adapters = _adapter_module_ids(model)
    done: dict[int, QuantLinear] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not _is_float_linear(child) or id(child) in adapters:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if skip_fn(parent_name if child_name == "base_layer" else name):
                continue
            if id(child) not in done:
                done[id(child)] = _quantized(child, bits)
            setattr(parent, child_name, done[id(child)])
    return len(done)


def _quantized(linear: nn.Module, bits: int) -> QuantLinear:
    """The QuantLinear ([out, in] storage) of a Linear or Conv1D (`stored_transposed`: [in, out] in the
    checkpoint); empty while the weight is a meta or ZeRO-3 placeholder: the loader fills it later."""
    w, conv1d = linear.weight, layers.is_conv1d(linear)
    if not (w.is_meta or hasattr(w, "ds_shape")):
        q = QuantLinear.from_weight(w.t() if conv1d else w, linear.bias, bits)
    else:
        fan_in, fan_out = layers.linear_dims(linear)
        q = QuantLinear(fan_in, fan_out, bits, linear.bias is not None, device="meta" if w.is_meta else "cpu")
    q.stored_transposed = conv1d
    return q


def quantize_rows(weight: Tensor, bits: int) -> dict[str, Tensor]:
    """{storage name: tensor} of a float weight, named as QuantLinear's parameters."""
    if bits == 8:
        q, s = quantize_int8(weight)
        return {"weight_int8": q, "weight_scale": s}
    q, s = quantize_nf4(weight)
    return {"weight_nf4": q, "weight_absmax": s}


STORAGE_NAMES = ("weight_int8", "weight_scale", "weight_nf4", "weight_absmax")


def _logical_bytes(t: Tensor) -> int:
    """Bytes of the whole tensor, sharded or not."""
    return logical_numel(t) * t.element_size()


def quantized_bytes(module: nn.Module) -> dict[str, int]:
    """Storage of all QuantLinear layers in ``module`` (whole tensors, not one rank's shard).

    Keys: ``int_bytes`` (int8 / packed NF4 storage), ``scale_bytes`` (row scales / block absmax),
    ``bias_bytes``, ``layers``.
    """
    out = {"int_bytes": 0, "scale_bytes": 0, "bias_bytes": 0, "layers": 0}
    for m in module.modules():
        if isinstance(m, QuantLinear):
            out["int_bytes"] += _logical_bytes(m.qweight)
            out["scale_bytes"] += _logical_bytes(m.qscale)
            out["bias_bytes"] += 0 if m.bias is None else _logical_bytes(m.bias)
            out["layers"] += 1
    return out
