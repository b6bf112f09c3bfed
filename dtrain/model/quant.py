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

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.model import layers
from dtrain.model.layers import NF4_BLOCKSIZE  # noqa: F401  (quant.NF4_BLOCKSIZE for its users)
from dtrain.model.shapes import logical_numel

SUPPORTED_BITS = (8, 4)
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


@functools.lru_cache(maxsize=None)
def _nf4_code_cached(device: str) -> Tensor:
    return bnbf.get_4bit_type("nf4", device=device, blocksize=NF4_BLOCKSIZE).float()


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 code values (sorted, float32, in [-1, 1]) on ``device``."""
    return _nf4_code_cached(str(torch.device(device)))


# ----------------------------------------------------------------------------- raw quantization


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8 quantization: returns ``(q int8 [out, in], scale float32 [out])``.

    Uses bitsandbytes' ``int8_vectorwise_quant`` (its CUDA kernel takes float16 only, so CUDA
    weights are rounded to float16 first). Rows that are all zero get ``q = 0``, ``scale = 0``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    w = w.to(torch.float16) if w.is_cuda else w.to(torch.float32)
    q, absmax, _ = bnbf.int8_vectorwise_quant(w.contiguous())
    absmax = absmax.to(torch.float32)
    q = q.masked_fill((absmax == 0).unsqueeze(1), 0)  # bnb divides by absmax: 0/0 for zero rows
    return q, absmax / 127.0


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` computed in float32, returned in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)).to(dtype)


def quantize_nf4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """NF4 quantization with bitsandbytes' ``quantize_4bit`` (block 64, no double quantization).

    Returns ``(packed uint8 [ceil(n/2), 1], absmax float32 [ceil(n/64)])``, ``n = weight.numel()``.
    """
    w = weight.detach()
    if w.dtype not in _BNB_DTYPES:
        w = w.to(torch.float32)
    packed, state = bnbf.quantize_4bit(
        w.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=False,
        quant_type="nf4", quant_storage=torch.uint8,
    )
    return packed.reshape(-1, 1), state.absmax.to(torch.float32)


def dequantize_nf4(
    packed: Tensor, absmax: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of ``quantize_nf4``: rebuilds the ``QuantState`` and calls ``dequantize_4bit``."""
    bnb_dtype = dtype if dtype in _BNB_DTYPES else torch.float32
    state = bnbf.QuantState(
        absmax=absmax.to(torch.float32).contiguous(), shape=torch.Size(shape),
        code=nf4_code(packed.device), blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=bnb_dtype,
    )
    out = bnbf.dequantize_4bit(packed.contiguous(), state)
    # bnb transposes the result when the packed tensor has one row (n <= 2): undo by reshape.
    return out.reshape(shape).to(dtype)


def round_trip(weight: Tensor, bits: int) -> Tensor:
    """deq(q(weight)) in float32: the weight a layer quantized to `bits` computes with."""
    if bits == 8:
        return dequantize_int8(*quantize_int8(weight))
    packed, absmax = quantize_nf4(weight)
    return dequantize_nf4(packed, absmax, tuple(weight.shape))


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
        self, in_features: int, out_features: int, bits: int, bias: bool = True, *,
        device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32,
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
        cls, weight: Tensor, bias: Tensor | None, bits: int, *,
        compute_dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """Quantize a float ``[out, in]`` weight (e.g. one tensor of a checkpoint shard)."""
        _check_bits(bits)
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                f"expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
        if weight.is_meta:
            raise ValueError("cannot quantize a meta-device weight: load the real weight first")
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, bits, bias is not None, device="meta",
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            compute_dtype=compute_dtype,
        )
        q, s = quantize_int8(weight) if bits == 8 else quantize_nf4(weight)
        layer._set_storage(q, s)
        if bias is not None:
            layer.bias = _frozen(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, *, compute_dtype: torch.dtype = torch.float32
    ) -> QuantLinear:
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
            raise ValueError(
                f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
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
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, bias={self.bias is not None}")


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
    return ((isinstance(module, nn.Linear) or layers.is_conv1d(module)) and not hasattr(module, "base_layer")
            and module.weight.is_floating_point())


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
