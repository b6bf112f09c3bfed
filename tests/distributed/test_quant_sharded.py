"""8-bit and NF4 frozen bases sharded over 2 gloo ranks: bytes per rank and training."""

from __future__ import annotations

import pytest

from tests.distributed.runs import probe
from tests.helpers import TINY, losses, metrics, train

# configs/tiny.yaml: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads, 2 layers.
# Linear layers (out x in) per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128.
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
LAYERS = 2
WEIGHTS = LAYERS * sum(o * i for o, i in SHAPES)  # 73,728 quantized weights (lm_head excluded)
ROWS = LAYERS * sum(o for o, _ in SHAPES)  # 1,024 rows: one fp32 scale each at 8 bits


# one backend per width in the default suite, the other two pairs on request
@pytest.mark.parametrize(
    ("backend", "bits"),
    [
        ("fsdp", 4),
        ("deepspeed", 8),
        pytest.param("fsdp", 8, marks=pytest.mark.ondemand),
        pytest.param("deepspeed", 4, marks=pytest.mark.ondemand),
    ],
)
def test_each_rank_holds_half_the_quantized_bytes(tmp_path, backend, bits):
    rows = probe(tmp_path, backend, [f"quantization.bits={bits}"])
    if bits == 8:
        storage, scales = WEIGHTS, 4 * ROWS  # 1 byte per weight + fp32 row scales
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
    train(
        tmp_path / "bf16",
        [*steps, "model.dtype=bf16", "backend.name=fsdp", "training.micro_batch_size=2"],
        nproc=2,
        launcher="torchrun",
    )
    train(
        tmp_path / "int8",
        [*steps, "quantization.bits=8", "backend.name=fsdp", "training.micro_batch_size=2"],
        nproc=2,
        launcher="torchrun",
    )
    a, b = losses(tmp_path / "bf16"), losses(tmp_path / "int8")
    for x, y in zip(a, b):
        assert abs(x - y) <= 5e-3 * x, (a, b)
    assert b[-1] < b[0]


def save_tiny_base(path) -> None:
    """configs/tiny.yaml's architecture as a plain HF checkpoint (random weights, seed 0)."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)


def eval_loss(model_dir, run_dir, examples: int) -> float:
    """Mean token loss of a plain HF model on the first `examples` held-out sequences of a run,
    the ones dtrain's own evaluation used."""
    import torch
    from transformers import AutoModelForCausalLM

    from dtrain import data as data_lib
    from dtrain.config import schema as config_lib
    from dtrain.model.tokenizer import load_tokenizer
    from dtrain.training.loss import token_loss

    cfg = config_lib.load(run_dir / "config.yaml")
    tok = load_tokenizer(run_dir / "tokenizer", cfg.data.path)
    _, held_out = data_lib.tokenize(cfg.data, data_lib.load_records(cfg.data), tok).split(
        cfg.data.eval_fraction, cfg.training.seed
    )
    batch = held_out.take(torch.arange(min(examples, len(held_out))))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = token_loss(logits, batch["labels"])
    return float(total) / count


def test_adapter_trained_on_8bit_base_merges_into_the_full_precision_base(tmp_path):
    """Eval loss of the 8-bit base + adapter (dtrain's own evaluation, 2 FSDP ranks) against the
    adapter merged into the full-precision base (a plain HF model): within 1% — the merged model
    differs from what training saw only by the 8-bit rounding of W0 (<= absmax/254 per weight) —
    and clearly below the base's own loss. `--base-bits 8` (dequantize, merge, bf16) within 1% too."""
    from dtrain.inference.merge import merge

    base, run = tmp_path / "base", tmp_path / "run"
    save_tiny_base(base)
    steps, micro = 20, 2
    train(
        run,
        [
            "model.arch=null",
            f"model.path={base}",
            "quantization.bits=8",
            "lora.targets=all-linear",
            f"training.max_steps={steps}",
            f"training.eval_every={steps}",
            "training.eval_batches=8",
            "backend.name=fsdp",
            f"training.micro_batch_size={micro}",
        ],
        nproc=2,
        launcher="torchrun",
    )
    trained = [row["eval_loss"] for row in metrics(run) if "eval_loss" in row][-1]
    examples = 8 * micro * 2  # eval_batches x micro-batch x ranks
    merge(base, run / "adapter", tmp_path / "merged")
    merge(base, run / "adapter", tmp_path / "merged8", base_bits=8)
    merged, merged8 = eval_loss(tmp_path / "merged", run, examples), eval_loss(tmp_path / "merged8", run, examples)
    plain = eval_loss(base, run, examples)
    print(
        f"eval loss: 8-bit base + adapter {trained:.4f}, merged fp32 {merged:.4f}, merged 8-bit->bf16 {merged8:.4f}, base {plain:.4f}"
    )
    assert abs(merged - trained) <= 0.01 * trained, (merged, trained)
    assert abs(merged8 - trained) <= 0.01 * trained, (merged8, trained)
    assert merged < plain - 0.2, (merged, plain)


@pytest.mark.ondemand  # exact resume itself is in the default suite (test_checkpoint)
@pytest.mark.parametrize("kind,bits", [("fsdp", 4), ("zero3", 8)])
def test_quantized_base_kill_and_resume_is_bit_exact(tmp_path, kind, bits):
    """As for the float base (tests/distributed/test_checkpoint.py): SIGKILL after a random step's
    checkpoint, resume, and the adapter equals an uninterrupted run's bit for bit."""
    from tests.distributed.runs import assert_same_run, kill_after, kill_step, run

    extra = [f"quantization.bits={bits}"]
    run(kind, tmp_path / "ref", extra)
    out = tmp_path / "run"
    kill_after(kind, out, kill_step(1, kind), extra)
    assert "resumed from" in run(kind, out, [*extra, "training.resume=auto"])
    assert_same_run(out, tmp_path / "ref")
