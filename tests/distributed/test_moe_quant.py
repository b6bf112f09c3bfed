"""An 8-bit mixture-of-experts base (attention and fused expert weights int8, dtrain/model/expert_quant.py)
trained with expert LoRA on 2 gloo ranks: FSDP2 (default suite) and ZeRO-3 (on request; NF4 on both too) each hold
half of the expert int8 bytes per rank, train (the loss goes down, every expert's B moves) and agree
with each other to 1e-5; a real FSDP2 run SIGKILLed after a random checkpoint resumes to the
uninterrupted run's losses and adapter, bit for bit (on request). One launch per backend trains
qwen3_moe and gpt_oss (its experts stored transposed) through tests/distributed/moe_probe.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from dtrain.model import expert_quant
from tests.distributed import runs
from tests.distributed.test_moe import PROBE, TARGETS
from tests.helpers import REPO, adapter, env_for_tests, launch_cmd, metrics
from tests.moe_models import save_all

FAMILIES = ["qwen3_moe", "gpt_oss"]
# 6 steps, a checkpoint each (tests/distributed/runs.py's STEPS, for its run comparison)
RUN = [
    f"training.max_steps={runs.STEPS}",
    "training.save_every=1",
    "training.keep_last=3",
    f"training.eval_every={runs.STEPS}",  # the same held-out rows at step 0 and at the end
]
KINDS = {"fsdp": "fsdp", "zero3": "deepspeed"}
# tests/moe_models.py: 2 layers x 4 experts x (gate_up [32, 32] + down [32, 16]): whole bytes of the
# expert storage and scales; 8 bits: 1 byte a weight, one fp32 per row; 4: half a byte, one fp32 per 64
WEIGHTS = 2 * 4 * (32 * 32 + 32 * 16)
EXPERT_BYTES = {8: (WEIGHTS, 4 * 2 * 4 * (32 + 32)), 4: (WEIGHTS // 2, 4 * WEIGHTS // 64)}


def _cmd(models, out, kind: str, families: list[str], extra: list[str] = (), bits: int = 8) -> list[str]:
    return launch_cmd(2, "torchrun")[:-2] + [
        PROBE,
        str(models),
        str(out),
        f"families={','.join(families)}",
        *TARGETS,
        *RUN,
        f"quantization.bits={bits}",
        f"backend.name={KINDS[kind]}",
        "training.micro_batch_size=4",
        *extra,
    ]


def _run(
    models, out, kind: str, bits: int = 8, families: list[str] = FAMILIES, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(models, out, kind, families, extra, bits=bits),
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )
    assert proc.returncode == 0, f"{kind}: exit {proc.returncode}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_all(tmp_path_factory.mktemp("moe_models_q"))


@pytest.fixture(scope="module")
def fsdp_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe8") / "fsdp"
    _run(models, out, "fsdp")
    return out


def _losses(out) -> list[float]:
    return [row["loss"] for row in metrics(out) if "loss" in row]


def _check_trained_and_sharded(models, out, backend: str, bits: int = 8) -> None:
    """Loss down, every expert's B moved; per rank: half the expert int8 bytes and scales, and the
    frozen bytes the estimator (dtrain/memory/shards.py) predicts for this 8-/4-bit base, exactly."""
    from dtrain.memory import model_spec, shards

    for family in FAMILIES:
        spec = model_spec.spec_from_config(json.loads((models / family / "config.json").read_text()), family)
        predicted = shards.frozen_tensors(spec, bits, 4).local_bytes(2, backend)
        losses, evals = _losses(out / family), [r["eval_loss"] for r in metrics(out / family) if "eval_loss" in r]
        # the held-out loss, not a step's: each step's loss is of other rows (they move by ~0.05 here)
        assert len(losses) == runs.STEPS and len(evals) == 2 and evals[1] < evals[0] - 0.05, (family, losses, evals)
        for rank in range(2):
            s = json.loads((out / family / f"storage-rank{rank}.json").read_text())
            assert (s["expert_storage_bytes"], s["expert_scale_bytes"]) == tuple(b // 2 for b in EXPERT_BYTES[bits])
            assert s["all_trainable_are_lora"] and s["frozen_bytes"] == predicted
        for key, b in adapter(out / family).items():
            if ".experts." in key and key.endswith("lora_B.weight"):  # every expert's B_e moved
                assert (b.reshape(b.shape[0], -1, 4).abs().sum(dim=(0, 1)) > 0).all(), key


def test_8bit_moe_base_trains_sharded_fsdp2(models, fsdp_run):
    _check_trained_and_sharded(models, fsdp_run, "fsdp")


@pytest.mark.ondemand  # a DeepSpeed launch (~60 s on 2 cores); FSDP2's above holds the same storage rule
def test_8bit_moe_base_trains_sharded_zero3_like_fsdp2(models, fsdp_run, tmp_path):
    runs._needs("zero3")
    _run(models, tmp_path / "zero3", "zero3")
    _check_trained_and_sharded(models, tmp_path / "zero3", "deepspeed")
    for family in FAMILIES:
        assert _losses(tmp_path / "zero3" / family) == pytest.approx(_losses(fsdp_run / family), rel=1e-5)
        ref = adapter(fsdp_run / family)
        for k, t in adapter(tmp_path / "zero3" / family).items():
            torch.testing.assert_close(t, ref[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.ondemand  # an FSDP2 and a DeepSpeed launch (~100 s)
def test_4bit_moe_base_trains_sharded_fsdp2_and_zero3_alike(models, tmp_path):
    runs._needs("zero3")
    for kind in KINDS:
        _run(models, tmp_path / kind, kind, bits=4)
        _check_trained_and_sharded(models, tmp_path / kind, KINDS[kind], bits=4)
    for family in FAMILIES:
        assert _losses(tmp_path / "zero3" / family) == pytest.approx(_losses(tmp_path / "fsdp" / family), rel=1e-5)


@pytest.mark.ondemand  # two more FSDP2 launches (~60 s); the dense kill tests cover the mechanism by default
def test_sigkill_8bit_moe_fsdp2_run_then_resume_is_bit_exact(models, fsdp_run, tmp_path):
    family = "qwen3_moe"
    k = runs.kill_step(1, "moe-8bit-fsdp")
    print(f"SIGKILL after the checkpoint of step {k}")
    out = tmp_path / family
    proc = runs.spawn(_cmd(models, tmp_path, "fsdp", [family]), out)
    runs.wait_for_checkpoint(proc, out, k)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before the kill"
    resumed = _run(models, tmp_path, "fsdp", families=[family], extra=["training.resume=auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    runs.assert_same_run(out, fsdp_run / family)


def test_merge_base_bits_8_folds_into_the_int8_expert_weights(models, fsdp_run, tmp_path):
    """`dtrain merge --base-bits 8` of the adapter trained on the 8-bit base: each expert weight is
    deq(q(W)) + s B_e A_e as dtrain/model/expert_quant.py stored W (per expert; qwen3_moe's checkpoint
    keeps per-expert tensors, gpt-oss fused [in, out] ones), written in bf16: equal to that reference,
    where W + s B_e A_e without the round trip differs in most elements (about 70% measured)."""
    from transformers import AutoModelForCausalLM

    from dtrain.inference import merge as merge_lib
    from dtrain.lora import experts

    for family in FAMILIES:
        merge_lib.merge(models / family, fsdp_run / family / "adapter", tmp_path / family, base_bits=8)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32)
        ad = adapter(fsdp_run / family)
        for i in range(2):
            mod = base.model.layers[i].mlp.experts
            for pname, prefix in (("gate_up_proj", "base_layer."), ("down_proj", "")):
                w = getattr(mod, pname).detach()
                key = f"base_model.model.model.layers.{i}.mlp.experts.{prefix}"
                d = experts.delta(ad[key + "lora_A.weight"], ad[key + "lora_B.weight"], 4, mod.is_transposed, 2.0)
                want = (expert_quant.round_trip(w, 8, mod.is_transposed) + d).to(torch.bfloat16)
                got = getattr(merged.model.layers[i].mlp.experts, pname).detach()
                assert torch.equal(got, want), (family, i, pname)
                assert (got == (w + d).to(torch.bfloat16)).float().mean() < 0.5, (family, i, pname)
