"""8-/4-bit storage for fused 3-D expert weights (quantization.bits on a mixture-of-experts model).

A quantized expert parameter `P` ([E, out, in], or [E, in, out] when the experts module
`is_transposed`, gpt-oss) is replaced on its experts module by two frozen plain tensors, stored
[E, out, in] in every family (a transposed weight is transposed while quantizing, as QuantLinear
does for a Conv1D) and quantized expert by expert:

* ``bits=8``: ``P_int8`` (int8 [E, out, in]) and ``P_scale`` (float32 [E, out]): row-wise absmax
  per expert, the 2-D int8 rule of dtrain/model/quant.py on each expert's [out, in] matrix;
* ``bits=4``: ``P_nf4`` (uint8 [E, ceil(out*in/2)]) and ``P_absmax`` (float32 [E, ceil(out*in/64)]):
  NF4 (blocks of 64) on each expert's flattened [out, in] matrix.

Dim 0 is the expert in every tensor, so FSDP2 (rows) and ZeRO-3 (flat partitions) shard them like
the float parameter, and a rank loading its rows reads and quantizes only its own experts.

The grouped expert forward (dtrain/lora/expert_forward.py) calls `grouped_linear`: tokens sorted by expert, one
matmul per expert with its weight dequantized on the spot; a custom autograd function saves the
quantized storage (not the float weight) and dequantizes again in backward, so the float [E, ...]
tensor never exists, in forward or held for backward. No distributed code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dtrain.model import quant
from dtrain.model.layers import NF4_BLOCKSIZE
from dtrain.model.shapes import logical_shape

SUFFIXES = {8: ("_int8", "_scale"), 4: ("_nf4", "_absmax")}
META_ATTR = "quantized_experts"  # on an experts module: {parameter name: ExpertQuant}, registration order


@dataclass(frozen=True)
class ExpertQuant:
    """One quantized expert parameter: bits, experts, the [out, in] of each expert, and whether the
    float parameter is stored [E, in, out] (its checkpoint and merge layout)."""

    bits: int
    experts: int
    out_features: int
    in_features: int
    transposed: bool

    @property
    def shape(self) -> torch.Size:
        """The float parameter's shape (as the checkpoint stores it)."""
        o, i = self.out_features, self.in_features
        return torch.Size((self.experts, i, o) if self.transposed else (self.experts, o, i))

    def storage(self) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of the integer storage and of the float32 scales."""
        e, n = self.experts, self.out_features * self.in_features
        if self.bits == 8:
            return ((e, self.out_features, self.in_features), torch.int8), ((e, self.out_features), torch.float32)
        return ((e, (n + 1) // 2), torch.uint8), ((e, math.ceil(n / NF4_BLOCKSIZE)), torch.float32)


def quantize_stack(w: Tensor, meta: ExpertQuant) -> tuple[Tensor, Tensor]:
    """(storage, scales) of float expert weights `w` ([e, ...] in the parameter's layout; any
    number of experts: a rank quantizes only its rows)."""
    w = w.detach().float()
    w = w.transpose(1, 2) if meta.transposed else w
    e, o, i = w.shape
    if meta.bits == 8:  # row-wise: the experts' rows side by side are the same rows
        q, s = quant.quantize_int8(w.reshape(e * o, i))
        return q.reshape(e, o, i), s.reshape(e, o)
    pairs = [quant.quantize_nf4(w[k]) for k in range(e)]
    n = o * i
    q = torch.stack([p.reshape(-1) for p, _ in pairs]) if pairs else torch.empty(0, (n + 1) // 2, dtype=torch.uint8)
    s = torch.stack([a for _, a in pairs]) if pairs else torch.empty(0, math.ceil(n / NF4_BLOCKSIZE))
    return q, s


def dequantize_expert(q: Tensor, s: Tensor, meta: ExpertQuant, dtype: torch.dtype) -> Tensor:
    """Expert weight [out, in] in `dtype` from its storage row `q` and scales `s`."""
    if meta.bits == 8:
        return quant.dequantize_int8(q, s, dtype)
    return quant.dequantize_nf4(q.reshape(-1, 1), s, (meta.out_features, meta.in_features), dtype)


def dequantize_stack(q: Tensor, s: Tensor, meta: ExpertQuant, dtype: torch.dtype = torch.float32) -> Tensor:
    """All experts in the float parameter's layout (merge and tests only: the forward never builds it)."""
    w = torch.stack([dequantize_expert(q[k], s[k], meta, dtype) for k in range(q.shape[0])])
    return w.transpose(1, 2) if meta.transposed else w


def round_trip(w: Tensor, bits: int, transposed: bool) -> Tensor:
    """deq(q(w)) of float expert weights [E, ., .] (layout as stored), float32: what training used."""
    meta = _meta(bits, tuple(w.shape), transposed)
    return dequantize_stack(*quantize_stack(w, meta), meta)


class _ExpertFn(torch.autograd.Function):
    """``x @ deq(q[e], s[e]).T``, saving the storage parameters (not a float weight) for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, s: Tensor, e: int, meta: ExpertQuant) -> Tensor:
        ctx.e, ctx.meta = e, meta
        ctx.save_for_backward(q, s)  # the parameters: re-gathered for backward under ZeRO-3 / FSDP2
        return x.matmul(dequantize_expert(q[e], s[e], meta, x.dtype).t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, s = ctx.saved_tensors
        w = dequantize_expert(q[ctx.e], s[ctx.e], ctx.meta, grad.dtype)
        return grad.matmul(w), None, None, None, None


def grouped_linear(experts: nn.Module, name: str, x: Tensor, counts: list[int]) -> Tensor:
    """Rows of `x` sorted by expert (counts[e] rows for expert e) times expert e's quantized weight
    `name`; one expert's float weight at a time."""
    meta = getattr(experts, META_ATTR)[name]
    q, s = storage(experts, name)
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(_ExpertFn.apply(x[start : start + c], q, s, e, meta))
            start += c
    return torch.cat(outs) if outs else x.new_zeros(0, meta.out_features)


def storage(experts: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """The (integer storage, scales) parameters of quantized expert weight `name`."""
    a, b = SUFFIXES[getattr(experts, META_ATTR)[name].bits]
    return getattr(experts, name + a), getattr(experts, name + b)


def quantized(experts: nn.Module) -> dict[str, ExpertQuant]:
    """{parameter: ExpertQuant} of an experts module ({} when its weights are float)."""
    return getattr(experts, META_ATTR, None) or {}


def param_shape(experts: nn.Module, name: str) -> torch.Size:
    """The float shape of expert parameter `name`, quantized or not."""
    meta = quantized(experts).get(name)
    return meta.shape if meta is not None else logical_shape(getattr(experts, name))


def quantize_module(experts: nn.Module, bits: int) -> bool:
    """Replace every 3-D float parameter of `experts` by its storage, in place, keeping the
    parameters' order; the storage is empty when the weight is a meta or ZeRO-3 placeholder (the
    loader fills it), else quantized from the weight. Returns whether anything was quantized."""
    if bits not in quant.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {quant.SUPPORTED_BITS}, got {bits!r}")
    metas: dict[str, ExpertQuant] = dict(quantized(experts))
    items = []
    for name, p in list(experts._parameters.items()):
        if p is None or name in metas or len(logical_shape(p)) != 3 or not p.is_floating_point():
            items.append((name, p))
            continue
        meta = _meta(bits, tuple(logical_shape(p)), bool(experts.is_transposed))
        metas[name] = meta
        items += zip((name + s for s in SUFFIXES[bits]), _storage_for(p, meta))
    if len(metas) == len(quantized(experts)):
        return False
    experts._parameters.clear()
    experts._parameters.update(items)
    setattr(experts, META_ATTR, metas)
    return True


def _meta(bits: int, shape: tuple[int, int, int], transposed: bool) -> ExpertQuant:
    e, a, b = shape
    return ExpertQuant(bits, e, b, a, True) if transposed else ExpertQuant(bits, e, a, b, False)


def _storage_for(p: Tensor, meta: ExpertQuant) -> tuple[nn.Parameter, nn.Parameter]:
    if not (p.is_meta or hasattr(p, "ds_shape")):
        q, s = quantize_stack(p, meta)
    else:
        device = "meta" if p.is_meta else "cpu"
        (qs, qd), (ss, sd) = meta.storage()
        q, s = torch.empty(qs, dtype=qd, device=device), torch.empty(ss, dtype=sd, device=device)
    return nn.Parameter(q, requires_grad=False), nn.Parameter(s, requires_grad=False)


def storage_map(model: nn.Module) -> dict[str, tuple[str, int, ExpertQuant]]:
    """{storage parameter name: (float parameter name, 0 storage / 1 scales, ExpertQuant)}, names as
    `model.named_parameters()` gives them (what the loader reads in place of the float weight)."""
    out = {}
    for mod_name, module in model.named_modules():
        for pname, meta in quantized(module).items():
            full = f"{mod_name}.{pname}" if mod_name else pname
            for k, suffix in enumerate(SUFFIXES[meta.bits]):
                out[full + suffix] = (full, k, meta)
    return out


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Whole (unsharded) bytes of quantized expert storage: `int_bytes`, `scale_bytes`, `params`
    (float parameters they stand for)."""
    out = {"int_bytes": 0, "scale_bytes": 0, "params": 0}
    for module in model.modules():
        for name, meta in quantized(module).items():
            q, s = storage(module, name)
            out["int_bytes"] += math.prod(logical_shape(q)) * q.element_size()
            out["scale_bytes"] += math.prod(logical_shape(s)) * s.element_size()
            out["params"] += math.prod(meta.shape)
    return out
