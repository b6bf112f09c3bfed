"""The LoRA variants (DoRA, rsLoRA, LoRA+) on 2 real gloo ranks with FSDP2 and ZeRO-3, against the
single-process run; DoRA on an 8-bit and a 4-bit base; exact resume with LoRA+'s two parameter groups."""

from __future__ import annotations

import math

import pytest

from tests.distributed import test_checkpoint as ckpt
from tests.helpers import adapter, assert_same_losses_and_adapter, losses, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# lr 1e-3 for equality runs: see test_fsdp.py
VARIANTS = ["lora.use_dora=true", "lora.use_rslora=true", "lora.loraplus_lr_ratio=4", "training.lr=1e-3"]
BACKENDS = {"fsdp": "fsdp", "zero3": "deepspeed"}


def run(out, backend: str = "none", extra: list[str] = ()):
    if backend == "none":
        return train(out, ["training.micro_batch_size=4", *extra])
    return train(out, [f"backend.name={backend}", "training.micro_batch_size=2", *extra], nproc=2, launcher="torchrun")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants-single")
    run(out, extra=VARIANTS)
    return out


@pytest.mark.parametrize("kind", BACKENDS)
def test_variants_on_two_ranks_equal_one_process(kind, reference, tmp_path):
    run(tmp_path, BACKENDS[kind], VARIANTS)
    assert_same_losses_and_adapter(reference, tmp_path, rel=1e-5, atol=1e-6)
    tensors = adapter(tmp_path)
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(tensors) == 12 and len(magnitudes) == 4  # q, v of 2 layers: A, B, m each
    assert all(tensors[k].shape == ((64,) if "q_proj" in k else (32,)) for k in magnitudes)  # out of q, v


@pytest.mark.ondemand  # DoRA on 8-bit trains in the default suite (below); this is the 2-rank equality
@pytest.mark.parametrize(("bits", "kind"), [(8, "fsdp"), (4, "zero3")])
def test_dora_on_a_quantized_base_on_two_ranks_equals_one_process(bits, kind, tmp_path):
    extra = ["lora.use_dora=true", f"quantization.bits={bits}", "training.lr=1e-3"]
    run(tmp_path / "one", extra=extra)
    run(tmp_path / "two", BACKENDS[kind], extra)
    assert_same_losses_and_adapter(tmp_path / "one", tmp_path / "two", rel=1e-5, atol=1e-6)


def test_dora_on_an_8bit_base_trains(tmp_path):
    run(tmp_path, extra=["lora.use_dora=true", "quantization.bits=8", "training.max_steps=8", "training.lr=1e-2"])
    got = losses(tmp_path)
    assert len(got) == 8 and all(math.isfinite(x) for x in got)
    assert got[-1] < got[0] - 0.05, got


@pytest.mark.ondemand  # exact resume itself is in the default suite (test_checkpoint)
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sigkill_then_resume_with_variants_is_bit_exact(kind, tmp_path):
    """LoRA+'s two parameter groups and DoRA's magnitude come back from a checkpoint exactly."""
    ckpt._needs(kind)
    ref = tmp_path / "ref"
    ckpt.run(kind, ref, VARIANTS)
    out = tmp_path / "run"
    ckpt.kill_after(kind, out, 2, VARIANTS)
    log = ckpt.run(kind, out, [*VARIANTS, "training.resume=auto"])
    assert "resumed from" in log
    ckpt.assert_same_run(out, ref)
