"""FSDP2 on 2 real gloo processes against the single-process reference."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.distributed.runs import probe
from tests.helpers import REPO, TINY, adapter, env_for_tests, launch_cmd, losses, run_dtrain, train

QV = "lora.targets=[q_proj,v_proj]"
# Equality runs use lr 1e-3: at 1e-2 Adam's normalized step turns a summation-order difference of
# 1e-7 in a near-zero gradient into a 1e-6 difference of a weight (one process split two ways
# differs just as much), which says nothing about the backends.
LR = "training.lr=1e-3"


def assert_same_run(a, b) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(x), (la, lb)
    A, B = adapter(a), adapter(b)
    assert A.keys() == B.keys() and len(A) == 8
    for k in A:
        torch.testing.assert_close(A[k], B[k], rtol=0, atol=2e-6)
    assert any(A[k].abs().sum() > 0 for k in A if "lora_B" in k)  # B moved off zero


def test_fsdp_two_ranks_equals_single_process(single, tmp_path):
    train(tmp_path, ["backend.name=fsdp", "training.micro_batch_size=2", LR], nproc=2, launcher="torchrun")
    assert_same_run(single, tmp_path)


def test_fsdp_grad_accum_and_gradient_checkpointing_equal_single(single, tmp_path):
    overrides = [
        "backend.name=fsdp",
        "training.micro_batch_size=1",
        "training.grad_accum=2",
        "model.gradient_checkpointing=true",
        LR,
    ]
    train(tmp_path, overrides, nproc=2, launcher="torchrun")
    assert_same_run(single, tmp_path)


def test_masked_instruction_loss_equal_across_rank_counts(tmp_path):
    data = ["data.path=dtrain/assets/tiny_instructions.jsonl", "data.format=instruction"]
    train(tmp_path / "one", [*data, "training.micro_batch_size=4", LR])
    train(
        tmp_path / "two", [*data, "backend.name=fsdp", "training.micro_batch_size=2", LR], nproc=2, launcher="torchrun"
    )
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.fixture(scope="module")
def fsdp_rows(tmp_path_factory) -> list[dict]:
    return probe(tmp_path_factory.mktemp("fsdp_probe"), "fsdp")


def test_each_rank_holds_half_the_frozen_bytes_and_lora_only_optimizer_state(fsdp_rows):
    rows = fsdp_rows
    assert len(rows) == 2
    full = rows[0]["full_frozen_bytes"]
    # tiny config: every frozen tensor has an even first dimension, so the halves are exact
    assert [r["frozen_bytes"] for r in rows] == [full // 2, full // 2]
    for r in rows:
        assert r["all_trainable_are_lora"] and len(r["trainable_names"]) == 8
        assert r["optimizer_state_entries"] == 8  # one per LoRA tensor, none for frozen weights
        assert r["optimizer_state_bytes"] == 2 * r["trainable_bytes"]  # exp_avg + exp_avg_sq


def test_units_are_blocks_embeddings_head_and_root(fsdp_rows, tmp_path):
    units = fsdp_rows[0]["fsdp_units"]
    layers = [f"model.layers.{i}" for i in range(2)]
    assert units == sorted(["", "lm_head", "model.embed_tokens", *layers])
    tied = probe(tmp_path / "tied", "fsdp", ["model.arch.tie_word_embeddings=true"])
    assert tied[0]["fsdp_units"] == sorted(["", *layers])  # one shared tensor: it stays in the root unit
    full = tied[0]["full_frozen_bytes"]
    assert [r["frozen_bytes"] for r in tied] == [full // 2, full // 2]


@pytest.mark.ondemand  # tied heads on FSDP2: the family matrix (gemma, gemma3_text) in the default suite
def test_tied_embeddings_two_ranks_equal_single_process(tmp_path):
    tie = "model.arch.tie_word_embeddings=true"
    train(tmp_path / "one", [tie, "backend.name=none", "training.micro_batch_size=4", LR])
    train(tmp_path / "two", [tie, "backend.name=fsdp", "training.micro_batch_size=2", LR], nproc=2, launcher="torchrun")
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_a_killed_rank_fails_the_job_quickly(tmp_path):
    cmd = launch_cmd(2, "torchrun") + [
        "train",
        str(TINY),
        QV,
        "backend.name=fsdp",
        "training.max_steps=100000",
        "training.eval_every=0",
        f"output.dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env_for_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.5)
        victim = worker_pids(proc.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.time() - killed_at < 60
        assert "exitcode  : -9" in out or "SIGKILL" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def worker_pids(launcher_pid: int) -> list[int]:
    """The launcher's child processes (the ranks), oldest first."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher_pid), "--sort=start_time"],
        capture_output=True,
        text=True,
        errors="replace",
    ).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2, out
    return pids


def test_backend_none_refuses_several_ranks(tmp_path):
    proc = run_dtrain(
        ["train", str(TINY), "backend.name=none", f"output.dir={tmp_path}"], nproc=2, launcher="torchrun", check=False
    )
    assert proc.returncode != 0
    assert "backend.name = none runs on one process" in proc.stderr
