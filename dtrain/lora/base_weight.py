"""A base layer's float weight: the weight a frozen linear computes with, which is its float
`weight` as stored, or a quantized layer's (dtrain.model.quant.QuantLinear) dequantized weight.
The one home of that rule, for DoRA's norms, merging and the plain models PEFT is compared on.
Plain torch: no distributed code here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtrain.model import layers


def has_float_weight(layer: nn.Module) -> bool:
    """The layer holds a float `weight` (not quantized storage)."""
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and w.is_floating_point()


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: its float weight, or the dequantized one (float32). For
    a whole, materialized layer."""
    return layer.weight if has_float_weight(layer) else layer.dequantized_weight()


def whole_float_weight(layer: nn.Module) -> torch.Tensor | None:
    """`float_weight(layer)` when the layer holds its whole weight, else None (a placeholder that a
    sharding backend fills later: what depends on the weight is then filled from the weight source)."""
    if has_float_weight(layer):
        w = layer.weight
        return w if tuple(w.shape) == (layer.out_features, layer.in_features) else None
    n = layer.out_features * layer.in_features
    return layer.dequantized_weight() if layer.qweight.numel() == (n if layer.bits == 8 else (n + 1) // 2) else None


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A frozen float32 nn.Linear holding a quantized layer's dequantized weight (and its bias)."""
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantized_weight())
        if bias is not None:
            linear.bias.copy_(bias.float())
    linear.requires_grad_(False)
    return linear


def float_linear(layer: nn.Module) -> nn.Module:
    """The layer itself when its weight is float, else its dequantized nn.Linear (to merge into)."""
    return layer if has_float_weight(layer) else dequantized_linear(layer)


def rows_from_source(
    layer: nn.Module, read: Callable[[slice | None], torch.Tensor], rows: slice | None
) -> tuple[torch.Tensor, slice | None]:
    """The weight `layer` computes with, from the float checkpoint weight `read(rows)` returns: cast
    to the layer's dtype, or quantized and dequantized as the layer stores it. Only `rows` are read
    where the storage is row-wise (a float weight, int8, NF4 with whole blocks per row); else the
    whole weight, with the rows still to take of what is computed from it (NF4 blocks of 64 may
    cross rows). Returns (weight, rows still to take or None)."""
    bits = getattr(layer, "bits", None)
    if bits is None:  # a float weight, as the model stores it
        return read(rows).to(layer.weight.dtype), None
    from dtrain.model.quant import round_trip  # bitsandbytes: only where a layer is quantized

    row_wise = bits == 8 or layer.in_features % layers.NF4_BLOCKSIZE == 0
    w = round_trip(read(rows if row_wise else None).float(), bits)
    return w, (None if row_wise else rows)
