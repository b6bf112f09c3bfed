"""A `messages` run (SmolLM2 tokenizer and template, tiny random Llama with its vocabulary) trains end
to end on 2 ranks with FSDP2, padded and packed."""

from __future__ import annotations

import math

import pytest

from tests.helpers import REPO, adapter, losses, metrics, train

MESSAGES = REPO / "dtrain" / "assets" / "tiny_messages.jsonl"


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.ondemand)])
def test_messages_fsdp_two_ranks(smollm2_dir, tmp_path, packing: bool) -> None:
    out = tmp_path / "run"
    args = [
        f"data.path={MESSAGES}",
        "data.format=messages",
        f"data.tokenizer={smollm2_dir}",
        "model.arch.vocab_size=49152",
        "data.seq_len=96",
        f"data.packing={str(packing).lower()}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "backend.name=fsdp",
        "training.micro_batch_size=2",
        "training.eval_every=2",
        "training.eval_batches=1",
    ]
    proc = train(out, args, nproc=2, launcher="torchrun")
    assert "48 records -> 48 examples" in proc.stderr
    ls = losses(out)
    assert len(ls) == 4 and all(math.isfinite(v) for v in ls)
    assert any("eval_loss" in row for row in metrics(out))
    pads = [row["padding_fraction"] for row in metrics(out) if "loss" in row]
    assert all(0 <= p < 1 for p in pads)
    if packing:
        assert "packed 44 train examples into" in proc.stderr
    A = adapter(out)
    assert A and any(A[k].abs().sum() > 0 for k in A if "lora_B" in k)
