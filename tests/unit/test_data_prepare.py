"""data.prepare: the weighted mix, eval_path, and the token cache (a second run does not tokenize)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dtrain import data
from dtrain.config.schema import DataConfig
from dtrain.data import BatchPlan, pipeline
from dtrain.model.tokenizer import build_tokenizer
from tests.helpers import REPO

INSTRUCTIONS = REPO / "dtrain" / "assets" / "tiny_instructions.jsonl"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(INSTRUCTIONS)


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture()
def two_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"prompt": f"Question {i}?", "response": f" answer {i}."} for i in range(60)])
    write_jsonl(b, [{"instruction": f"Task {i}.", "input": "", "output": f"done {i}"} for i in range(20)])
    return a, b


def test_weighted_mix_draws_in_proportion(tmp_path, tok, two_files) -> None:
    a, b = two_files
    cfg = DataConfig(
        format="instruction",
        seq_len=32,
        eval_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
        mix=[{"path": str(a), "weight": 1}, {"path": str(b), "format": "alpaca", "weight": 3}],
    )
    prep = data.prepare(cfg, tok, seed=5)
    assert len(prep.train) == 80  # as many as the two files hold, in the proportion 1 : 3
    assert Counter(prep.train.source.tolist()) == {0: 20, 1: 60}
    # the examples drawn over an epoch of the batch plan: 1 : 3
    plan = BatchPlan(len(prep.train), micro_batch=4, grad_accum=1, world=2, seed=5)
    drawn = Counter(
        int(prep.train.source[i]) for s in range(plan.steps_per_epoch) for r in range(2) for i in plan.indices(s, 0, r)
    )
    assert drawn == {0: 20, 1: 60}
    # every file-b example is used three times before any fourth time; file a's 20 of 60 are distinct
    b_rows = prep.train.input_ids[prep.train.source == 1]
    assert Counter(Counter(map(tuple, b_rows.tolist())).values()) == {3: 20}
    assert len(set(map(tuple, prep.train.input_ids[prep.train.source == 0].tolist()))) == 20


def test_eval_path_is_the_eval_set(tmp_path, tok, two_files) -> None:
    a, b = two_files
    ev = tmp_path / "ev.jsonl"
    write_jsonl(ev, [{"prompt": "Held out?", "response": " yes."}] * 3)
    cfg = DataConfig(path=str(a), format="instruction", seq_len=32, eval_path=str(ev), cache_dir=str(tmp_path / "c"))
    prep = data.prepare(cfg, tok, seed=0)
    assert len(prep.train) == 60 and len(prep.eval) == 3  # eval_fraction (0.1) unused
    want = tok("Held out?", add_special_tokens=False)["input_ids"]
    assert prep.eval.input_ids[0, : len(want)].tolist() == want


def test_second_run_reads_the_token_cache(tmp_path, tok, two_files, monkeypatch, caplog) -> None:
    a, _ = two_files
    cfg = DataConfig(path=str(a), format="instruction", seq_len=32, cache_dir=str(tmp_path / "cache"))
    calls = []
    real = pipeline.encode_all
    monkeypatch.setattr(pipeline, "encode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = data.prepare(cfg, tok, seed=0)
    assert calls == [1] and not first.cache_hit
    (entry,) = (tmp_path / "cache").iterdir()
    assert {p.name for p in entry.iterdir()} == {"tokens.safetensors", "counts.json"}
    assert json.loads((entry / "counts.json").read_text())["datasets"][0]["counts"]["examples"] == 60
    with caplog.at_level(logging.INFO, logger="dtrain.data"):
        second = data.prepare(cfg, tok, seed=0)
    assert calls == [1] and second.cache_hit and "token cache hit" in caplog.text
    for k in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(getattr(first.train, k), getattr(second.train, k))
        assert torch.equal(getattr(first.eval, k), getattr(second.eval, k))
    # another rank: waits at the barrier, then reads rank 0's entry
    waited = []
    other = data.prepare(cfg, tok, seed=0, is_main=False, barrier=lambda: waited.append(1))
    assert waited == [1] and other.cache_hit and calls == [1]
    # changed data bytes or settings: a new entry
    write_jsonl(a, [{"prompt": "Changed?", "response": " yes."}] * 40)
    data.prepare(cfg, tok, seed=0)
    data.prepare(DataConfig(**{**cfg.__dict__, "seq_len": 16}), tok, seed=0)
    assert calls == [1, 1, 1] and len(list((tmp_path / "cache").iterdir())) == 3


def test_packing_through_prepare(tmp_path, tok, two_files) -> None:
    a, _ = two_files
    cfg = DataConfig(
        path=str(a), format="instruction", seq_len=64, packing=True, eval_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    prep = data.prepare(cfg, tok, seed=0)
    unpacked = data.prepare(DataConfig(**{**cfg.__dict__, "packing": False}), tok, seed=0)
    assert len(prep.train) <= len(unpacked.train) // 3 and unpacked.cache_hit  # packing is not in the key
    assert int(prep.train.attention_mask.sum()) == int(unpacked.train.attention_mask.sum())
    assert set(prep.train.take(torch.tensor([0]))) == {"input_ids", "labels", "position_ids"}
