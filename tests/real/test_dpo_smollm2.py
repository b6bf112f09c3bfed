"""The DPO demonstration on the real SmolLM2-135M-Instruct (launch/dpo_demo.py, docs/dpo.md): pairs
from the shipped date task (chosen = the right date, rejected = the base model's own greedy answer up
to its first space), DPO from the base and from an SFT adapter. Held-out preference accuracy (chosen
more likely than rejected, computed outside dtrain's trainer) rises from the base's to >= 0.8.
About 16 minutes on 2 CPU cores at load 2-4 (docs/dpo.md): ondemand. The bounds below are
set from that run (numbers next to each)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ondemand]


def test_dpo_demo_raises_preference_accuracy(smollm2_dir, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("dpo_demo", REPO / "launch" / "dpo_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.chdir(REPO)
    result = demo.main(tmp_path / "demo")
    base, dpo, sft, dpo_sft = (result[k] for k in ("base", "dpo_from_base", "sft", "dpo_from_sft"))
    print(
        {
            k: (v["preference_accuracy"], v["mean_logp_margin"], v["exact_match"])
            for k, v in result.items()
            if isinstance(v, dict) and "preference_accuracy" in v
        }
    )
    # Every base answer echoes the ISO date, so every held-out pair is a pair.
    assert result["eval_pairs"] == demo.N_EVAL and result["train_pairs"] == demo.N_TRAIN
    # Measured 0.0 (margin -7.05 nats): the base prefers its own echo in every pair. 0.2 leaves room
    # for a few pairs flipping on another torch build without admitting a base that already knows.
    assert base["preference_accuracy"] <= 0.2 and base["mean_logp_margin"] < 0
    # Measured 1.0 (margin +43.7): 0.8 is the bar, far above the base's 0.0.
    assert dpo["preference_accuracy"] >= 0.8 and dpo["mean_logp_margin"] > 0
    # Measured 0/40 -> 8/40 and SFT 36/40: DPO alone moves greedy answers towards the format, SFT
    # teaches the dates.
    assert dpo["exact_match"] > base["exact_match"] and sft["exact_match"] >= 0.8
    # SFT already ranks every pair right (1.0, +37.9); DPO on it, against it, measured 1.0, +47.3 and
    # 35/40 at lr 2e-5: it must keep the ranking, widen the margin and keep SFT's answers to within 4
    # of 40 (launch/dpo_demo.from_sft: lr 1e-3 ended at 0/40).
    assert dpo_sft["preference_accuracy"] >= 0.8 and dpo_sft["mean_logp_margin"] > sft["mean_logp_margin"]
    assert dpo_sft["exact_match"] >= sft["exact_match"] - 0.1
