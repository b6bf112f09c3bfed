"""The chunked loss on 2 ranks (FSDP2 and ZeRO-3, tied and untied head) trains exactly like the
unchunked single-process run: the head's forward, where the chunked loss runs, is where each
backend has the head's weight whole (dtrain/training/loss.py)."""

from __future__ import annotations

import pytest

from tests.helpers import assert_same_losses_and_adapter, train

LR = "training.lr=1e-3"  # equality runs: see test_deepspeed.py's docstring
CHUNK = "training.loss_chunk_tokens=24"  # several chunks per 2 x 32-token micro-batch


@pytest.mark.slow
@pytest.mark.distributed
# on request: the same equality runs in process in tests/unit/test_chunked_loss.py
@pytest.mark.parametrize(
    "tied", [pytest.param(False, marks=pytest.mark.ondemand), pytest.param(True, marks=pytest.mark.ondemand)]
)
def test_chunked_two_ranks_equal_unchunked_one_process(tied, tmp_path):
    tie = f"model.arch.tie_word_embeddings={str(tied).lower()}"
    train(
        tmp_path / "one", [tie, "backend.name=none", "training.micro_batch_size=4", LR, "training.chunked_loss=false"]
    )
    for name in ("fsdp", "deepspeed"):
        proc = train(
            tmp_path / name,
            [tie, f"backend.name={name}", "training.micro_batch_size=2", LR, "training.chunked_loss=true", CHUNK],
            nproc=2,
            launcher="torchrun",
        )
        assert "chunked loss: on, 24 tokens per chunk" in proc.stderr
        assert_same_losses_and_adapter(tmp_path / "one", tmp_path / name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", [pytest.param("deepspeed", marks=pytest.mark.ondemand), pytest.param("fsdp", marks=pytest.mark.ondemand)]
)
def test_attention_checkpointing_every_2nd_block_two_ranks_equal_one_process(name, tmp_path):
    """The attention-only policy recomputes through the attention's submodules, whose sharding
    hooks gather their weights again (ZeRO-3) inside the unsharded block (FSDP2)."""
    policy = ["model.gradient_checkpointing=attention", "model.gradient_checkpointing_every=2", LR]
    train(tmp_path / "one", ["backend.name=none", "training.micro_batch_size=4", LR])
    proc = train(
        tmp_path / name, [f"backend.name={name}", "training.micro_batch_size=2", *policy], nproc=2, launcher="torchrun"
    )
    assert "gradient checkpointing (attention only): blocks [0]" in proc.stderr
    assert_same_losses_and_adapter(tmp_path / "one", tmp_path / name)
