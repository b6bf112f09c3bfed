r"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as PEFT computes it; the `DoRA` variant
(dtrain.lora.variants), selected by `lora.use_dora`.

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
rows of W0 (`DoRA.initial_state`, called by model.ModelSource). A quantized base
(dtrain.model.quant.QuantLinear) contributes through its forward (dequantized), and its norms are
those of the dequantized weight (dtrain.lora.base_weight). No distributed code here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.lora import base_weight
from dtrain.lora.variants import LoraVariant

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name of the ModuleDict (saved as `<module>.lora_magnitude_vector`)


class DoRA(LoraVariant):
    """DoRA for one adapter of a LoRA layer: owns the magnitude m (and ||W0||_row) in
    `layer.lora_magnitude_vector[name]`, and the row norm of the merge while merged."""

    flag = "use_dora"
    state = (MAGNITUDE,)
    fast_state = (MAGNITUDE,)  # a 1-D adapter parameter, grouped with B as PEFT's create_loraplus_optimizer does
    name, title = "DoRA", "DoRA magnitude"
    conv1d = False  # the norms are over W0's rows; not written for the transposed layout

    def __init__(self) -> None:
        self.merged_norm: torch.Tensor | None = None  # ||W0 + s B A||_row of the merge, to unmerge

    def init(self, layer: nn.Module, name: str, device: torch.device) -> None:
        if layer.fan_in_fan_out and not self.conv1d:
            raise ConfigError(
                f"lora.use_dora: {layer.qualified_name} is a Conv1D layer (weight stored in x out), "
                "which dtrain's DoRA does not adapt; use plain LoRA for this model"
            )
        getattr(layer, MAGNITUDE)[name] = Magnitude(layer.out_features, device=device)

    def reset(self, layer: nn.Module, name: str) -> None:
        """m = ||W0||_row; left to the loader (`initial_state`) where the base weight is not whole."""
        w0 = base_weight.whole_float_weight(layer.base_layer)
        if w0 is not None:
            magnitude = getattr(layer, MAGNITUDE)[name]
            magnitude.weight.copy_(row_norms(w0))
            magnitude.base_norm.copy_(magnitude.weight)

    def initial_state(
        self, layer: nn.Module, name: str, leaf: str, read: Callable[[slice | None], torch.Tensor], rows: slice | None
    ) -> torch.Tensor:
        """m (`weight`) and ||W0||_row (`base_norm`) both start at the row norms of the weight the
        base computes with (as stored in the model's dtype, or dequantized), for `rows` only."""
        w, rest = base_weight.rows_from_source(layer.base_layer, read, rows)
        norms = row_norms(w)
        return norms if rest is None else norms[rest]

    def saved_shape(self, kind: str, fan_in: int, fan_out: int) -> tuple[int, ...]:
        return (fan_out,)  # one magnitude per output row

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return forward(
            h,
            x,
            out,
            layer.base_layer,
            layer.lora_A[name],
            layer.lora_B[name],
            layer.lora_dropout[name],
            getattr(layer, MAGNITUDE)[name],
            layer.scaling[name],
        )

    def merge(self, layer: nn.Module, name: str, w: torch.Tensor) -> None:
        """W' = m / ||W0 + s B A||_row * (W0 + s B A)."""
        merged, self.merged_norm = merged_weight(w, layer.delta_weight(name), getattr(layer, MAGNITUDE)[name].weight)
        w.copy_(merged.to(w.dtype))

    def unmerge(self, layer: nn.Module, name: str, w: torch.Tensor) -> None:
        g = getattr(layer, MAGNITUDE)[name].weight.float() / self.merged_norm
        w.copy_((w.float() / g.unsqueeze(1) - layer.delta_weight(name)).to(w.dtype))
        self.merged_norm = None

    def merged_tensor(self, w: torch.Tensor, delta: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return merged_weight(w, delta, tensors[MAGNITUDE])[0]


class Magnitude(nn.Module):
    """DoRA's m (`weight`, trainable, PEFT's `lora_magnitude_vector.<name>`) and ||W0||_row (`base_norm`,
    frozen). Called with the output before scaling, it returns output * m / ||W0 + s B A||_row."""

    def __init__(self, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))
        self.base_norm = nn.Parameter(
            torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False
        )

    def forward(
        self, total: torch.Tensor, w0_at: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        with torch.no_grad():
            norm = adapted_norms(self.base_norm, w0_at, a, b, scaling)
        return total * (self.weight / norm.to(self.weight.dtype))


def adapted_norms(
    base_norm: torch.Tensor, w0_at: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A||_row (float32) from ||W0||_row, W0 A^T ([r, out] as the base layer gives it), A and B."""
    b, a = b.float(), a.float()
    cross = (b * w0_at.float().t()).sum(1)
    square = ((b @ (a @ a.t())) * b).sum(1)
    sq = base_norm.float().square() + (2 * scaling) * cross + (scaling * scaling) * square
    return sq.clamp_min(0).sqrt()


@torch.no_grad()
def row_norms(w: torch.Tensor) -> torch.Tensor:
    """||w||_row in float32 (rows of a weight, or of a rank's shard of it)."""
    return torch.linalg.vector_norm(w.float(), dim=1)


def forward(
    h: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    base_layer: nn.Module,
    lora_a: nn.Linear,
    lora_b: nn.Linear,
    dropout: nn.Module,
    magnitude: Magnitude,
    scaling: float,
) -> torch.Tensor:
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
