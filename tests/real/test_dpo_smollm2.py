"""The DPO demonstration on the real SmolLM2-135M-Instruct (launch/dpo_demo.py, docs/dpo.md): pairs
from the shipped date task (chosen = the right date, rejected = the base model's own greedy answer),
DPO from the base and from an SFT adapter. Held-out preference accuracy (chosen more likely than
rejected, computed outside dtrain's trainer) rises from the base's to >= 0.8 both ways; exact match
does not fall below the starting point's. About 20-40 minutes on 2 busy CPU cores: ondemand."""

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
    base, sft = result["base"], result["sft"]
    print({k: (v["preference_accuracy"], v["exact_match"]) for k, v in result.items() if isinstance(v, dict)
           and "preference_accuracy" in v})
    assert result["eval_pairs"] >= 40 and base["preference_accuracy"] <= 0.6
    for after, before in ((result["dpo_from_base"], base), (result["dpo_from_sft"], sft)):
        assert after["preference_accuracy"] >= 0.8 and after["preference_accuracy"] > before["preference_accuracy"]
        assert after["exact_match"] >= before["exact_match"]
