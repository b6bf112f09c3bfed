"""Tied input/output embeddings (`tie_word_embeddings: true`, as in SmolLM2, Llama-3.2, Qwen2.5,
Gemma) on every backend: one tensor after load, counted and sharded once, and ZeRO-3 on 2 ranks
training exactly like 1 process and like 2-rank FSDP2."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.distributed import runs
from tests.helpers import PY, REPO, TINY, assert_same_losses_and_adapter, env_for_tests, train

TIE = "model.arch.tie_word_embeddings=true"
LR = "training.lr=1e-3"  # equality runs: see test_deepspeed.py's docstring


def tiny_frozen_numel(tied: bool) -> int:
    """The tiny Llama's frozen parameters from its config: the embedding matrix once when tied."""
    a = yaml.safe_load(TINY.read_text())["model"]["arch"]
    h, i, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]
    kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q o, k v, gate up down, 2 norms
    return v * h * (1 if tied else 2) + a["num_hidden_layers"] * per_layer + h


@pytest.mark.ondemand  # tied heads on both backends: the family matrix (gemma, gemma3_text) in the default suite
def test_zero3_tied_two_ranks_equal_one_process_and_fsdp(tmp_path):
    train(tmp_path / "one", [TIE, "backend.name=none", "training.micro_batch_size=4", LR])
    for name in ("deepspeed", "fsdp"):
        train(
            tmp_path / name,
            [TIE, f"backend.name={name}", "training.micro_batch_size=2", LR],
            nproc=2,
            launcher="torchrun",
        )
        assert_same_losses_and_adapter(tmp_path / "one", tmp_path / name)


# ZeRO-3 on request: its tied head trains in the default suite in test_families (gemma2)
@pytest.mark.parametrize("backend", [pytest.param("deepspeed", marks=pytest.mark.ondemand), "fsdp"])
def test_tied_weight_is_one_tensor_and_each_rank_holds_half(backend, tmp_path):
    rows = runs.probe(tmp_path, backend, [TIE])
    full = 4 * tiny_frozen_numel(tied=True)  # fp32
    for r in rows:
        assert r["head_is_embedding"], r
        assert r["full_frozen_bytes"] == full, (r["full_frozen_bytes"], full)
    # every tiny tensor has an even number of elements and rows: the halves are exact
    assert [r["frozen_bytes"] for r in rows] == [full // 2, full // 2]


def test_zero3_build_imports_nothing_inside_zero_init():
    """Whatever transformers imports lazily is imported before `deepspeed.zero.Init` (which
    patches torch.Tensor.__new__; torch._dynamo refuses to import under it)."""
    cmd = [
        PY,
        str(REPO / "tests/distributed/zero_init_imports.py"),
        str(TINY),
        TIE,
        "backend.name=deepspeed",
        "backend.device=cpu",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["imported_inside_zero_init"] == []
    assert row["head_is_embedding"]
