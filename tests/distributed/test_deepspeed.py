"""DeepSpeed ZeRO-3 on 2 real gloo processes against the single-process reference.

lr is 1e-3 here (tiny.yaml says 1e-2): the two runs sum the same gradients in a different order
(one matmul over 4 sequences vs 2 + 2 reduced over ranks), a ~1e-7 relative difference, and
AdamW's per-element normalisation m / sqrt(v) turns that into an update difference proportional
to lr on elements whose gradient nearly cancels. At lr 1e-2 one element of 4096 differed by
1.5e-6 after 4 steps (one process with micro-batch 2 x accumulation 2 differs from micro-batch 4
by 7e-7 the same way); at 1e-3 the differences are ~10x smaller, well inside atol 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.distributed.conftest import REFERENCE
from tests.helpers import REPO, TINY, adapter, env_for_tests, launch_cmd, metrics, train

ZERO3 = ["backend.name=deepspeed", *REFERENCE]  # the `single` fixture (conftest.py) is the reference


def assert_same_run(ref, run) -> None:
    a, b = metrics(ref), metrics(run)
    ea, eb = [r["eval_loss"] for r in a if "eval_loss" in r], [r["eval_loss"] for r in b if "eval_loss" in r]
    assert len(ea) == len(eb) == 3  # before the first step, at step 2 and at step 4 (the last)
    for x, y in zip(ea, eb):  # eval reads eval_batches x micro-batch x ranks sequences
        assert abs(x - y) <= 1e-5 * abs(x), (ea, eb)
    a, b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    la, lb = [r["loss"] for r in a], [r["loss"] for r in b]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(x), (la, lb)
    for x, y in zip(a, b):
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    A, B = adapter(ref), adapter(run)
    assert A.keys() == B.keys() and len(A) == 8
    for k in A:
        assert A[k].dtype == B[k].dtype == torch.float32
        torch.testing.assert_close(A[k], B[k], rtol=0, atol=1e-6)
    assert any(A[k].abs().sum() > 0 for k in A if "lora_B" in k)  # B moved off zero


def test_zero3_two_ranks_equals_single_process(single, tmp_path):
    """Same seed, data and global batch (4): 1 process x 4 vs 2 ZeRO-3 ranks x 2 (torchrun)."""
    train(tmp_path, [*ZERO3, "training.micro_batch_size=2"], nproc=2, launcher="torchrun")
    assert_same_run(single, tmp_path)


def test_deepspeed_launcher_grad_accum_and_gradient_checkpointing(single, tmp_path):
    """The `deepspeed` launcher end to end; micro-batch 1 x accumulation 2 per rank and
    non-reentrant gradient checkpointing under ZeRO-3 still give the single-process run."""
    overrides = [
        *ZERO3,
        "training.micro_batch_size=1",
        "training.grad_accum=2",
        "model.gradient_checkpointing=true",
        "training.eval_batches=4",
    ]  # 4 x 1 x 2 ranks: the reference's 8 eval sequences (2 x 4 x 1)
    proc = train(tmp_path, overrides, nproc=2, launcher="deepspeed")
    assert_same_run(single, tmp_path)
    assert "terminate called" not in proc.stderr  # the process group is destroyed at the end


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> list[dict]:
    """tests/distributed/ds_probe.py on 2 ranks: one JSON report per rank."""
    out = tmp_path_factory.mktemp("ds_probe")
    cmd = launch_cmd(2, "torchrun")[:-2] + [str(REPO / "tests" / "distributed" / "ds_probe.py"), str(out)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=300
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_holds_half_of_the_frozen_bytes(probe):
    for row in probe:
        s = row["sharding"]
        assert s["full_frozen_bytes"] > 0
        assert abs(s["frozen_bytes"] - s["full_frozen_bytes"] / 2) <= 0.01 * s["full_frozen_bytes"], s
    # the two ranks' partitions add up to the whole (up to the alignment padding of each tensor)
    total = sum(row["sharding"]["frozen_bytes"] for row in probe)
    assert 0 <= total - probe[0]["sharding"]["full_frozen_bytes"] < 4096


def test_optimizer_state_is_lora_only_and_two_fp32_tensors_per_parameter(probe):
    for row in probe:
        opt = row["optimizer"]
        assert opt["names"], row
        params = {n.rsplit(".", 1)[0] for n in opt["names"]}
        assert all(".lora_A." in p or ".lora_B." in p for p in params), params
        assert {n.rsplit(".", 1)[1] for n in opt["names"]} == {"exp_avg", "exp_avg_sq"}
        assert len(params) == 8
        assert opt["dtypes"] == ["torch.float32"]
        assert opt["bytes"] == 2 * row["sharding"]["trainable_bytes"]  # fp32 m and v per local LoRA element
        assert opt["meta_is_json"]


def test_save_then_load_into_a_new_engine_gives_the_same_next_step(probe):
    for row in probe:
        r = row["resume"]
        assert r["loss_resumed"] == r["loss_ref"], r
        assert r["lora_max_diff"] == 0.0, r
        assert r["lr_resumed"] == r["lr_ref"]
        # load_full_state after setup_optimizer reaches the fp32 masters too
        assert row["reload_after_setup"]["loss"] == r["loss_ref"]
        assert row["reload_after_setup"]["lora_max_diff"] == 0.0


def test_gradient_checkpointing_same_losses_and_update(probe):
    for row in probe:
        c = row["ckpt"]
        assert c["losses_ckpt"] == pytest.approx(c["losses_plain"], rel=1e-6, abs=0), c
        assert c["lora_max_diff"] <= 1e-7, c
        # the checkpointed layer's attention ran twice per micro-batch: forward and recompute
        assert c["layer0_forwards_2_steps"] == 2 * c["micro_batches_2_steps"], c
        assert row["training_mode"] is True


def test_a_failure_on_one_rank_ends_the_job_with_its_error(tmp_path):
    """Rank 0 alone reads the base weights; a tensor missing from the checkpoint fails rank 0 while
    rank 1 waits in the next module's gather: the job must end quickly, non-zero, with rank 0's
    one-line error, not hang in the collective."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"])
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).save_pretrained(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(model_dir / "model.safetensors"), {"format": "pt"})
    start = time.monotonic()
    overrides = [*ZERO3, "training.micro_batch_size=2", f"model.path={model_dir}", "model.arch=null"]
    proc = train(tmp_path / "run", overrides, nproc=2, launcher="torchrun", check=False, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "checkpoint has no tensor 'model.layers.1.mlp.down_proj.weight'" in proc.stderr
    assert elapsed < 120, elapsed
