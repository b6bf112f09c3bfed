r"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as PEFT computes it.

The adapted weight is split into a direction and a learned magnitude per output row:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        (m: [out], the norm over the input dim)

m starts at ||W0||_row (B = 0), so the model's output is unchanged before the first step. As in
the paper (section 4.3) and PEFT, the norm is a constant for autograd (no gradient flows through
it), so it is computed under `no_grad` and costs no activation memory. The forward pass never
builds W': with n = ||W0 + s B A||_row (a constant) and g = m / n,

    h = W0 x + b + (g - 1) * (W0 x') + g * s * B A x'     (PEFT's formula; x' = dropout(x))

which, without dropout (x' = x), is h = b + g * (W0 x + s B A x): one output-sized tensor saved
for backward (the product's other factor is g, [out]). With dropout the base layer runs a second
time on x' as PEFT's does (W0 x' is needed).

Distributed training: the norm needs the whole rows of W0 and of B (and all of A). FSDP2
all-gathers a unit's parameters before its forward, and ZeRO-3 gathers a module's parameters
before its forward (backends/deepspeed.py makes each LoRA layer a ZeRO-3 leaf module when DoRA
is on, so the base weight is still gathered after the base layer's own forward): the norm is
computed from gathered tensors that forward needs anyway, no extra communication. The initial
magnitude is row-local: each row's norm needs only that row of W0, which is how FSDP2 fills it
(model.ModelSource reads the rows of the base weight that the rank's magnitude shard covers).
A quantized base (dtrain.quant.QuantLinear) is dequantized for the norm, the weight the layer
computes with. No distributed code in this file.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_CHUNK_ELEMENTS = 1 << 22  # rows of W0 + s B A built at a time for the norm (16 MiB in fp32)


class Magnitude(nn.Module):
    """The magnitude vector m of one adapter: `weight` [out], as PEFT's `lora_magnitude_vector.<name>`."""

    def __init__(self, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen weight the base layer computes with: its float weight, or a quantized layer's
    dequantized weight (float32)."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    return layer.dequantized_weight()


@torch.no_grad()
def row_norms(w0: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
              scaling: float = 0.0) -> torch.Tensor:
    """||W0 + s B A|| over the input dim of every output row, float32 [out], without autograd.

    Rows are processed in chunks so that no more than NORM_CHUNK_ELEMENTS of the sum exist at once.
    """
    out_features, in_features = w0.shape
    step = max(1, NORM_CHUNK_ELEMENTS // max(1, in_features))
    parts = []
    for start in range(0, out_features, step):
        rows = w0[start:start + step].float()
        if b is not None and scaling:
            rows = rows + scaling * (b[start:start + step].float() @ a.float())
        parts.append(torch.linalg.vector_norm(rows, dim=1))
    return torch.cat(parts) if parts else w0.new_zeros(0, dtype=torch.float32)


def forward(x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module, lora_a: nn.Module, lora_b: nn.Module,
            dropout: nn.Module, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """The DoRA layer's output, given `out` = base_layer(x) (bias included) and `x` in the LoRA dtype."""
    norm = row_norms(base_weight(base_layer), lora_a.weight, lora_b.weight, scaling)
    g = magnitude / norm.to(magnitude.dtype)
    bias = getattr(base_layer, "bias", None)
    if isinstance(dropout, nn.Identity) or not dropout.training:
        base = out if bias is None else out - bias.to(out.dtype)
        total = (base + lora_b(lora_a(x)) * scaling) * g
        return (total if bias is None else total + bias).to(out.dtype)
    dropped = dropout(x)
    base = base_layer(dropped.to(out.dtype))
    if bias is not None:
        base = base - bias.to(base.dtype)
    return (out - base + (base + lora_b(lora_a(dropped)) * scaling) * g).to(out.dtype)


@torch.no_grad()
def merged_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m / ||W0 + delta||_row * (W0 + delta) in float32, the norm): the merged DoRA weight."""
    w = w0.float() + delta.float()
    norm = torch.linalg.vector_norm(w, dim=1)
    return (magnitude.float() / norm).unsqueeze(1) * w, norm
