"""Bytes one rank holds of each sharded tensor, by the backend's own cutting rule, for LoRA's model
states: what `dtrain memory` measures on a real run and what a fake-process-group run of the FSDP2
backend places (dtrain/backends/simulate.py), tensor by tensor, so that the estimate equals both.

* FSDP2 cuts dim 0 like ``torch.chunk``: ``ceil(d0 / N)`` rows per rank, the last ranks fewer (or
  none); it allocates the padded ``ceil(d0 / N)`` rows on every rank. The estimate is rank 0's
  share, the largest. A LoRA A of r rows on N > r ranks is 1/r of A per rank, not 1/N.
* ZeRO-3 cuts the flattened tensor: ``ceil(numel / N)`` elements per rank (the last padded).

Optimizer tensors: torch AdamW (FSDP2) keeps m and v like their parameter plus a 4-byte ``step``
per parameter tensor; ZeRO-3 keeps one flat fp32 partition with m, v and a separate fp32 master
(12 B per element; DeepSpeed 0.19 copies even fp32 parameters) plus one 4-byte ``step`` per
sub-group (``sub_group_size``, 1e9 elements by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dtrain.memory.model_spec import LinearModule, ModelSpec

NF4_BLOCK = 64
DS_SUB_GROUP = 1_000_000_000
STEP_BYTES = 4


@dataclass(frozen=True)
class Tensors:
    """(shape, bytes per element, how many) of a set of tensors."""

    items: tuple[tuple[tuple[int, ...], int, int], ...]

    def local_bytes(self, world: int, backend: str) -> int:
        """Bytes of these tensors on rank 0 (the largest share) of ``world`` ranks."""
        return sum(count * size * local_numel(shape, world, backend) for shape, size, count in self.items)

    def local_numel(self, world: int, backend: str) -> int:
        return sum(count * local_numel(shape, world, backend) for shape, _, count in self.items)

    @property
    def count(self) -> int:
        return sum(count for _, _, count in self.items)


def local_numel(shape: tuple[int, ...], world: int, backend: str) -> int:
    """Elements of a tensor of ``shape`` on rank 0 of ``world`` ranks (see the module docstring)."""
    numel = math.prod(shape)
    if world == 1 or numel == 0:
        return numel
    if backend == "deepspeed":
        return math.ceil(numel / world)
    rows = shape[0] if shape else 1
    return math.ceil(rows / world) * (numel // rows)


def linear_storage(lin: LinearModule, bits: int, param_bytes: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes per element) of one block linear's frozen tensors, as dtrain.model.quant stores them:
    16: the weight in the parameter dtype; 8: int8 [out, in] + fp32 scale [out]; 4: NF4 uint8
    [ceil(out*in/2), 1] + fp32 absmax [ceil(out*in/64)]; the bias in the parameter dtype."""
    n = lin.weight_params
    if bits == 8:
        out = [((lin.out_features, lin.in_features), 1), ((lin.out_features,), 4)]
    elif bits == 4:
        out = [(((n + 1) // 2, 1), 1), ((math.ceil(n / NF4_BLOCK),), 4)]
    else:
        out = [((lin.out_features, lin.in_features), param_bytes)]
    if lin.bias:
        out.append(((lin.out_features,), param_bytes))
    return out


def frozen_tensors(spec: ModelSpec, bits: int, param_bytes: int) -> Tensors:
    """LoRA's frozen base: block linears (maybe quantized) plus every other parameter (embeddings,
    head, norms) in the parameter dtype."""
    items = [(shape, size, lin.count) for lin in spec.linears for shape, size in linear_storage(lin, bits, param_bytes)]
    items += [(shape, param_bytes, count) for shape, count in spec.other_shapes]
    return Tensors(tuple(items))


def lora_tensors(targets: tuple[LinearModule, ...], rank: int) -> Tensors:
    """fp32 A (r x in) and B (out x r) of every targeted linear."""
    items = []
    for lin in targets:
        items += [((rank, lin.in_features), 4, lin.count), ((lin.out_features, rank), 4, lin.count)]
    return Tensors(tuple(items))


def lora_model_states(
    spec: ModelSpec, targets: tuple[LinearModule, ...], rank: int, bits: int, param_bytes: int, world: int, backend: str
) -> dict[str, int]:
    """Rank 0's frozen, trainable, gradient and optimizer bytes for LoRA (see the module docstring)."""
    frozen = frozen_tensors(spec, bits, param_bytes)
    lora = lora_tensors(targets, rank)
    trainable = lora.local_bytes(world, backend)
    if backend == "deepspeed":
        steps = max(1, math.ceil(lora.local_numel(world, backend) / DS_SUB_GROUP))
        optimizer = 3 * trainable + STEP_BYTES * steps
    else:
        optimizer = 2 * trainable + STEP_BYTES * lora.count
    return {
        "frozen_weights": frozen.local_bytes(world, backend),
        "trainable_params": trainable,
        "gradients": trainable,
        "optimizer_state": optimizer,
    }
