"""8-bit and NF4 frozen bases sharded over 2 gloo ranks: bytes per rank and training."""

from __future__ import annotations

import pytest

from tests.distributed.test_fsdp import probe
from tests.helpers import losses, train

# configs/tiny.yaml: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads, 2 layers.
# Linear layers (out x in) per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128.
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
LAYERS = 2
WEIGHTS = LAYERS * sum(o * i for o, i in SHAPES)       # 73,728 quantized weights (lm_head excluded)
ROWS = LAYERS * sum(o for o, _ in SHAPES)              # 1,024 rows: one fp32 scale each at 8 bits


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
@pytest.mark.parametrize("bits", [8, 4])
def test_each_rank_holds_half_the_quantized_bytes(tmp_path, backend, bits):
    rows = probe(tmp_path, backend, [f"quantization.bits={bits}"])
    if bits == 8:
        storage, scales = WEIGHTS, 4 * ROWS             # 1 byte per weight + fp32 row scales
    else:
        storage, scales = WEIGHTS // 2, 4 * (WEIGHTS // 64)  # 0.5 byte per weight + fp32 absmax per 64
    for r in rows:
        assert r["quant_storage_bytes"] == storage // 2
        assert r["quant_scale_bytes"] == scales // 2
        assert r["all_trainable_are_lora"]


def test_8bit_base_trains_like_the_bf16_base(tmp_path):
    """Tolerance: the 8-bit row-wise error is <= scale/2 = absmax/254 per weight (0.4% of the row's
    largest weight); over 4 steps the loss stays within 0.5% of the bf16-base run's."""
    steps = ["training.max_steps=4"]
    train(tmp_path / "bf16", [*steps, "model.dtype=bf16", "backend.name=fsdp", "training.micro_batch_size=2"],
          nproc=2, launcher="torchrun")
    train(tmp_path / "int8", [*steps, "quantization.bits=8", "backend.name=fsdp", "training.micro_batch_size=2"],
          nproc=2, launcher="torchrun")
    a, b = losses(tmp_path / "bf16"), losses(tmp_path / "int8")
    for x, y in zip(a, b):
        assert abs(x - y) <= 5e-3 * x, (a, b)
    assert b[-1] < b[0]
