r"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as PEFT computes it.

The adapted weight is split into a direction and a learned magnitude per output row:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        (m: [out], the norm over the input dim)

m starts at ||W0||_row (B = 0), so the model's output is unchanged before the first step. As in
the paper (section 4.3) and PEFT, the norm n is a constant for autograd (no gradient flows through
it), so it is computed under `no_grad` and costs no activation memory. The forward pass never
builds W': with g = m / n,

    h = W0 x + b + (g - 1) * (W0 x') + g * s * B A x'     (PEFT's formula; x' = dropout(x))

which, without dropout (x' = x), is h = b + g * (W0 x + s B A x): one output-sized tensor saved
for backward (the product's other factor is g, [out]). With dropout the base layer runs a second
time on x' as PEFT's does (W0 x' is needed).

The norm, without an [out, in] temporary: row i of W0 + s B A has the squared norm

    n_i^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T

||W0||_row is frozen: it is kept next to m as `base_norm` (a frozen parameter, never saved in the
adapter: recomputed from the base at build). W0 A^T is the base layer applied to the r rows of A.

Sharding. Every parameter is read inside its own module's call (A and B by calling them without
input, `AdapterLinear`; W0 through the base layer's forward; m and ||W0||_row in `Magnitude`'s
forward), never as an attribute of another module: FSDP2 gathers a unit (a decoder block) before
its forward and ZeRO-3 gathers a module's parameters at its own call, so this works under both
with no extra communication beyond one more use of the gathered base weight. The per-row vectors
are sharded with the rows (FSDP2 shards dim 0): each rank fills its m and ||W0||_row from its own
rows of W0 (model.ModelSource). A quantized base (dtrain.model.quant.QuantLinear) contributes through its
forward (dequantized), and its norms are those of the dequantized weight. No distributed code here.
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterLinear(nn.Linear):
    """LoRA's A or B: an nn.Linear that, called without input, returns a detached copy of its weight
    (read inside its own call, where sharding backends have gathered it)."""

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            return self.weight.detach().clone()
        return super().forward(x)


class Magnitude(nn.Module):
    """DoRA's m (`weight`, trainable, PEFT's `lora_magnitude_vector.<name>`) and ||W0||_row (`base_norm`,
    frozen). Called with the output before scaling, it returns output * m / ||W0 + s B A||_row."""

    def __init__(self, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))
        self.base_norm = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                      requires_grad=False)

    def forward(self, total: torch.Tensor, w0_at: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        with torch.no_grad():
            norm = adapted_norms(self.base_norm, w0_at, a, b, scaling)
        return total * (self.weight / norm.to(self.weight.dtype))


def adapted_norms(base_norm: torch.Tensor, w0_at: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """||W0 + s B A||_row (float32) from ||W0||_row, W0 A^T ([r, out] as the base layer gives it), A and B."""
    b, a = b.float(), a.float()
    cross = (b * w0_at.float().t()).sum(1)
    square = ((b @ (a @ a.t())) * b).sum(1)
    sq = base_norm.float().square() + (2 * scaling) * cross + (scaling * scaling) * square
    return sq.clamp_min(0).sqrt()


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen weight the base layer computes with: its float weight, or a quantized layer's
    dequantized weight (float32). For a whole, materialized layer (init, merge)."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    return layer.dequantized_weight()


def whole_base_weight(layer: nn.Module) -> torch.Tensor | None:
    """`base_weight(layer)` when the layer holds its whole weight, else None (a placeholder that a
    sharding backend fills later: the norms are then filled from the weight source too)."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w if tuple(w.shape) == (layer.out_features, layer.in_features) else None
    n = layer.out_features * layer.in_features
    return layer.dequantized_weight() if layer.qweight.numel() == (n if layer.bits == 8 else (n + 1) // 2) else None


@torch.no_grad()
def row_norms(w: torch.Tensor) -> torch.Tensor:
    """||w||_row in float32 (rows of a weight, or of a rank's shard of it)."""
    return torch.linalg.vector_norm(w.float(), dim=1)


def forward(h: torch.Tensor, x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module, lora_a: AdapterLinear,
            lora_b: AdapterLinear, dropout: nn.Module, magnitude: Magnitude, scaling: float) -> torch.Tensor:
    """The DoRA layer's output, given `out` = base_layer(x) (bias included), `x` the base layer's
    input and `h` the same input in the LoRA dtype."""
    with torch.no_grad():
        a, b = lora_a(), lora_b()
        probe = torch.cat([a, a.new_zeros(1, a.shape[1])]).to(x.dtype)
        rows = base_layer(probe)  # [A; 0] W0^T + bias: W0 A^T and the bias, through the base's forward
        bias, w0_at = rows[-1], rows[:-1] - rows[-1]
    if isinstance(dropout, nn.Identity) or not dropout.training:
        total = magnitude(out - bias + lora_b(lora_a(h)) * scaling, w0_at, a, b, scaling)
        return (total + bias).to(out.dtype)
    dropped = dropout(h)
    base = base_layer(dropped.to(x.dtype)) - bias
    total = magnitude(base + lora_b(lora_a(dropped)) * scaling, w0_at, a, b, scaling)
    return (out - base + total).to(out.dtype)


@torch.no_grad()
def merged_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m / ||W0 + delta||_row * (W0 + delta) in float32, the norm): the merged DoRA weight."""
    w = w0.float() + delta.float()
    norm = torch.linalg.vector_norm(w, dim=1)
    return (magnitude.float() / norm).unsqueeze(1) * w, norm
