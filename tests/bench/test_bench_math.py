"""The benchmark's arithmetic and goal verdicts on given numbers (no timing is asserted anywhere)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bench import presets, report, runners
from bench.common import Device


@pytest.fixture(scope="module")
def run():
    """bench/run.py's pieces: presets and variants, the runners' Outcome, the report's arithmetic."""
    return SimpleNamespace(
        Outcome=runners.Outcome,
        count_params=runners.count_params,
        BY_NAME=presets.BY_NAME,
        LLAMA_58M=presets.LLAMA_58M,
        mfu=report.mfu,
        goals=report.goals,
    )


def outcome(run, name, step_s, peak, world=2, tokens=2048):
    return run.Outcome(
        run.BY_NAME[name], status="ok", median_step_s=step_s, tokens_per_step=tokens, world=world, peak_bytes=peak
    )


def test_parameter_counts_of_the_presets(run):
    p = run.count_params(run.LLAMA_58M)
    h, f, v, layers = 512, 1376, 32000, 8
    linear = layers * (4 * h * h + 3 * h * f) + v * h  # q k v o, gate up down; the head
    assert p["linear"] == linear
    assert p["total"] == linear + v * h + layers * 2 * h + h  # + embeddings, norms
    assert round(p["total"] / 1e6, 1) == 58.1


def test_mfu_counts_4p_for_lora_and_6p_for_full(run):
    params = {"linear": 1_000_000_000, "total": 1_100_000_000}
    h100 = Device(cuda=True, name="NVIDIA H100 80GB HBM3")
    lora = outcome(run, "dtrain-fsdp", step_s=1.0, peak=1.0, world=1, tokens=8192)
    full = outcome(run, "dtrain-fsdp-full", step_s=1.0, peak=1.0, world=1, tokens=8192)
    assert run.mfu(lora, params, h100) == pytest.approx(4e9 * 8192 / 989e12)
    assert run.mfu(full, params, h100) == pytest.approx(6e9 * 8192 / 989e12)
    assert math.isnan(run.mfu(lora, params, Device(cuda=False, name="cpu")))
    assert math.isnan(run.mfu(lora, params, Device(cuda=True, name="Unknown GPU")))


def test_goal_verdicts(run):
    gib = 2**30
    res = {
        "dtrain-fsdp": outcome(run, "dtrain-fsdp", 1.0, 10 * gib),
        "dtrain-fsdp-full": outcome(run, "dtrain-fsdp-full", 1.3, 40 * gib),
        "dtrain-fsdp-8bit": outcome(run, "dtrain-fsdp-8bit", 1.0, 7 * gib),
        "peft-fsdp": outcome(run, "peft-fsdp", 1.25, 11 * gib),
        "latency": run.Outcome(
            run.BY_NAME["latency"], status="ok", extra={"merged_over_base": 1.01, "unmerged_over_base": 1.2}
        ),
    }
    gl = {g.text: g for g in run.goals(res, Device(cuda=True, name="H100"))}
    assert (gl["[fsdp] LoRA >= 1.25x full-FT tokens/s"].value, gl["[fsdp] LoRA >= 1.25x full-FT tokens/s"].status) == (
        "1.30x",
        "met",
    )
    assert gl["[fsdp] LoRA peak memory <= 1/3 of full FT"].status == "met"  # 0.25
    assert gl["[fsdp] 8-bit LoRA peak memory <= 1/6 of full FT"].status == "missed"  # 0.175
    assert gl["[fsdp] dtrain >= PEFT+accelerate tokens/s (goal 1.2x)"].status == "met"  # 1.25x
    assert gl["[fsdp] dtrain peak memory <= PEFT+accelerate"].status == "met"
    assert gl["merged latency within 2% of base"].status == "met"
    assert gl["[ds] LoRA >= 1.25x full-FT tokens/s"].status.startswith("n/a: dtrain-ds not run")
    cpu = {g.text: g for g in run.goals(res, Device(cuda=False, name="cpu"))}
    assert cpu["[fsdp] LoRA >= 1.25x full-FT tokens/s"].status == "GPU-only goal (CPU value for information)"


def test_presets_are_frozen_and_overrides_make_a_new_one():
    cpu = presets.PRESETS["cpu"]
    longer = cpu.with_overrides(steps=2, seq_len=4096)
    assert (longer.steps, longer.seq_len, longer.arch["max_position_embeddings"]) == (2, 4096, 4096)
    assert (cpu.steps, cpu.seq_len, cpu.arch["max_position_embeddings"]) == (12, 256, 1024)
    with pytest.raises(AttributeError):
        cpu.steps = 1
    with pytest.raises(TypeError):
        presets.LLAMA_58M["vocab_size"] = 1
