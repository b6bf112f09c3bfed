"""dtrain.data: the instruction prompt mask, bad records, file formats, packing, split and the batch plan."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch

from dtrain import data
from dtrain.config.schema import DataConfig
from dtrain.data import IGNORE, BatchPlan
from dtrain.errors import ConfigError
from dtrain.model.tokenizer import build_tokenizer
from tests.helpers import REPO

ASSETS = REPO / "dtrain" / "assets"
INSTRUCTIONS = ASSETS / "tiny_instructions.jsonl"
CORPUS = ASSETS / "tiny_corpus.txt"

RECORDS = [
    {"prompt": "What is two plus two?\nAnswer:", "response": " four."},
    {"prompt": "Name a colour.\nAnswer:", "response": " The sky is blue, and so is the sea."},
    {"prompt": "Say hi.", "response": " hi"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(INSTRUCTIONS)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def instruction_cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), format="instruction", **kw)


def check_mask(ex: data.Examples, records: list[dict], tok, seq_len: int) -> None:
    """Labels: -100 on prompt and padding, = input_ids on response + EOS (computed independently)."""
    all_ids, all_labels, all_mask = ex.input_ids, ex.labels, ex.attention_mask  # each access densifies every row
    assert all_ids.shape == all_labels.shape == all_mask.shape == (len(records), seq_len)
    for i, rec in enumerate(records):
        p, r = encode(tok, rec["prompt"]), encode(tok, rec["response"]) + [tok.eos_token_id]
        n = min(len(p) + len(r), seq_len)
        ids, labels, mask = all_ids[i].tolist(), all_labels[i].tolist(), all_mask[i].tolist()
        assert ids[:n] == (p + r)[:n]
        assert ids[n:] == [tok.pad_token_id] * (seq_len - n)
        assert mask == [1] * n + [0] * (seq_len - n)
        np_ = min(len(p), n)
        assert labels[:np_] == [IGNORE] * np_  # prompt
        assert labels[np_:n] == ids[np_:n]  # response + EOS
        assert labels[n:] == [IGNORE] * (seq_len - n)  # padding
        if len(p) + len(r) <= seq_len:
            assert ids[n - 1] == tok.eos_token_id and labels[n - 1] == tok.eos_token_id
            assert sum(v != IGNORE for v in labels) == len(r)
            assert tok.decode(ids[: len(p)]) == rec["prompt"]
            assert tok.decode(labels[len(p) : n - 1]) == rec["response"]


# ---- instruction format: the prompt mask -----------------------------------------------------


def test_prompt_mask_on_shipped_instructions(tok) -> None:
    cfg = instruction_cfg(INSTRUCTIONS, seq_len=48)
    records = data.load_records(cfg)
    assert len(records) == 400 and set(records[0]) == {"prompt", "response"}
    ex = data.tokenize(cfg, records, tok)
    assert len(ex) == 400 and ex.skipped == 0
    check_mask(ex, records, tok, 48)
    assert int((ex.attention_mask == 0).sum()) > 0  # padding was exercised


def test_prompt_mask_hand_made(tmp_path, tok) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, RECORDS)
    lengths = [len(encode(tok, r["prompt"])) + len(encode(tok, r["response"])) + 1 for r in RECORDS]
    assert lengths[0] <= 24 < lengths[1] and lengths[2] <= 24
    cfg = instruction_cfg(path, seq_len=24)  # data.truncation: drop (the default)
    ex = data.tokenize(cfg, data.load_records(cfg), tok)
    check_mask(ex, [RECORDS[0], RECORDS[2]], tok, 24)  # the long record was dropped
    n_resp = [len(encode(tok, r["response"])) + 1 for r in (RECORDS[0], RECORDS[2])]
    assert (ex.labels != IGNORE).sum(1).tolist() == n_resp  # exactly response + EOS


def test_truncate_keeps_the_end(tmp_path, tok) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, RECORDS)
    cfg = instruction_cfg(path, seq_len=24, truncation="truncate")
    ex = data.tokenize(cfg, data.load_records(cfg), tok)
    assert len(ex) == 3
    p, r = encode(tok, RECORDS[1]["prompt"]), encode(tok, RECORDS[1]["response"]) + [tok.eos_token_id]
    full = p + r
    assert ex.input_ids[1].tolist() == full[-24:]  # the prompt's start was cut, the answer and EOS kept
    assert ex.labels[1].tolist() == ([IGNORE] * len(p) + r)[-24:]
    assert ex.labels[1, -1] == tok.eos_token_id
    cfg = instruction_cfg(path, seq_len=24, truncation="error")
    with pytest.raises(ConfigError, match=rf"record 1 has {len(full)} tokens, more than data.seq_len = 24"):
        data.tokenize(cfg, data.load_records(cfg), tok)


def test_prompt_longer_than_seq_len_never_reaches_training(tmp_path, tok) -> None:
    path = tmp_path / "long.jsonl"
    rec = {"prompt": "one two three four five six seven eight nine ten eleven twelve", "response": " ok"}
    write_jsonl(path, [rec])
    cfg = instruction_cfg(path, seq_len=4)
    assert len(encode(tok, rec["prompt"])) > 4
    with pytest.raises(ConfigError) as e:
        data.tokenize(cfg, data.load_records(cfg), tok)
    assert str(e.value) == (
        f"data.path = '{path}': no example has a labelled token within data.seq_len = 4 "
        "(1 records -> 0 examples; dropped 1 over seq_len; data.truncation = drop)"
    )
    cfg = instruction_cfg(path, seq_len=4, truncation="truncate")
    ex = data.tokenize(cfg, data.load_records(cfg), tok)
    full = encode(tok, rec["prompt"]) + encode(tok, rec["response"]) + [tok.eos_token_id]
    assert ex.input_ids[0].tolist() == full[-4:]
    assert int((ex.labels[0] != IGNORE).sum()) == len(encode(tok, " ok")) + 1


def test_custom_field_names(tmp_path, tok) -> None:
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"q": r["prompt"], "a": r["response"]} for r in RECORDS])
    cfg = instruction_cfg(path, seq_len=32, prompt_field="q", response_field="a")
    check_mask(data.tokenize(cfg, data.load_records(cfg), tok), RECORDS, tok, 32)


# ---- bad records ----------------------------------------------------------------------------

BAD = [
    RECORDS[0],
    {"prompt": "", "response": " x"},  # 1: empty prompt
    {"prompt": "Only a prompt"},  # 2: missing response
    RECORDS[1],
    {"prompt": "Blank answer", "response": "   "},  # 4: whitespace only
    {"prompt": None, "response": " y"},  # 5: null
    RECORDS[2],
]


def test_bad_records_skipped_and_counted(tmp_path, tok, caplog) -> None:
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, BAD)
    cfg = instruction_cfg(path, seq_len=32)
    with caplog.at_level(logging.WARNING, logger="dtrain.data"):
        ex = data.tokenize(cfg, data.load_records(cfg), tok)
    assert ex.skipped == 4 and len(ex) == 3
    check_mask(ex, RECORDS, tok, 32)
    assert "skipped 4 record(s) with a missing or empty field (first: record 1)" in caplog.text


def test_bad_records_error_names_the_record(tmp_path, tok) -> None:
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, BAD)
    cfg = instruction_cfg(path, seq_len=32, bad_records="error")
    with pytest.raises(ConfigError) as e:
        data.tokenize(cfg, data.load_records(cfg), tok)
    assert str(e.value) == f"data.path = '{path}': record 1 has a missing or empty 'prompt'"
    write_jsonl(path, [RECORDS[0], RECORDS[1], {"prompt": "p"}])
    with pytest.raises(ConfigError, match=r"record 2 has a missing or empty 'response'"):
        data.tokenize(cfg, data.load_records(cfg), tok)


def test_all_records_bad_is_an_error(tmp_path, tok) -> None:
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"prompt": "x"}, {"response": "y"}])
    cfg = instruction_cfg(path, seq_len=32)
    with pytest.raises(ConfigError, match=r"no usable records \(fields: prompt, response\)"):
        data.tokenize(cfg, data.load_records(cfg), tok)


def test_text_format_skips_empty_text(tmp_path, tok) -> None:
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": "the cat sat"}, {"text": ""}, {"body": "no text field"}, {"text": "the dog ran"}])
    cfg = DataConfig(path=str(path), format="text", seq_len=4)
    ex = data.tokenize(cfg, data.load_records(cfg), tok)
    assert ex.skipped == 2
    stream = encode(tok, "the cat sat") + [tok.eos_token_id] + encode(tok, "the dog ran") + [tok.eos_token_id]
    assert ex.input_ids.flatten().tolist() == stream[: len(stream) // 4 * 4]


# ---- file formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_structured_formats_load(tmp_path, tok, suffix: str) -> None:
    path = tmp_path / f"pairs.{suffix}"
    df = pd.DataFrame(RECORDS)
    if suffix == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == "json":
        path.write_text(json.dumps(RECORDS))  # a JSON array of objects
    elif suffix == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    cfg = instruction_cfg(path, seq_len=32)
    records = data.load_records(cfg)
    assert records == RECORDS
    check_mask(data.tokenize(cfg, records, tok), RECORDS, tok, 32)


def test_csv_keeps_numeric_looking_fields_as_text(tmp_path, tok) -> None:
    path = tmp_path / "numbers.csv"
    path.write_text('prompt,response\n"What is 2+2?",4\n"Half of one?",0.50\n"Blank?",\n')
    cfg = instruction_cfg(path, seq_len=16)
    records = data.load_records(cfg)
    assert [r["response"] for r in records[:2]] == ["4", "0.50"]  # not the int 4 and the float 0.5
    ex = data.tokenize(cfg, records, tok)
    assert ex.skipped == 1 and len(ex) == 2
    check_mask(
        ex, [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "Half of one?", "response": "0.50"}], tok, 16
    )


def test_txt_loads_paragraphs_and_packs(tmp_path, tok) -> None:
    paras = ["The red owl walks to the harbour.", "Two plus four is six.\nSix plus one is seven.", "The end."]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n")
    cfg = DataConfig(path=str(path), format="text", seq_len=8)
    records = data.load_records(cfg)
    assert [r["text"].strip() for r in records] == paras
    ex = data.tokenize(cfg, records, tok)
    stream = [t for r in records for t in encode(tok, r["text"]) + [tok.eos_token_id]]
    n = len(stream) // 8
    assert len(ex) == n > 0
    assert ex.input_ids.tolist() == [stream[i * 8 : (i + 1) * 8] for i in range(n)]
    assert torch.equal(ex.labels, ex.input_ids)  # packed text: every token has a label
    assert torch.equal(ex.attention_mask, torch.ones_like(ex.input_ids))


def test_shipped_corpus_packs(tok) -> None:
    cfg = DataConfig(path=str(CORPUS), format="text", seq_len=64)
    records = data.load_records(cfg)
    assert len(records) == 420 and all(r["text"].strip() for r in records)
    ex = data.tokenize(cfg, records, tok)
    n_tokens = sum(len(encode(tok, r["text"])) + 1 for r in records)
    assert len(ex) == n_tokens // 64
    assert int((ex.input_ids == tok.eos_token_id).sum()) > 0


def test_unsupported_and_malformed_files(tmp_path, tok) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(
        ConfigError, match=r"data.xml': unsupported file type \(allowed: .jsonl, .json, .csv, .parquet, .txt\)"
    ):
        data.load_records(instruction_cfg(path))
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(ConfigError, match=r"broken.parquet': cannot read as parquet"):
        data.load_records(instruction_cfg(path))


def test_too_little_text_is_an_error(tmp_path, tok) -> None:
    path = tmp_path / "short.txt"
    path.write_text("hi\n")
    cfg = DataConfig(path=str(path), format="text", seq_len=64)
    with pytest.raises(ConfigError, match=r"tokens, fewer than data.seq_len = 64"):
        data.tokenize(cfg, data.load_records(cfg), tok)


# ---- split and batch plan -------------------------------------------------------------------


def _examples(n: int) -> data.Examples:
    ids = torch.arange(n * 3).view(n, 3).tolist()
    return data.pad_rows([(r, r) for r in ids], 3, pad_id=0)


def test_split_is_seeded_disjoint_and_complete() -> None:
    ex = _examples(50)
    tr, ev = ex.split(0.1, seed=3)
    assert (len(tr), len(ev)) == (45, 5)
    rows = lambda e: {int(r[0]) // 3 for r in e.input_ids}  # noqa: E731
    assert rows(tr).isdisjoint(rows(ev)) and rows(tr) | rows(ev) == set(range(50))
    tr2, ev2 = ex.split(0.1, seed=3)
    assert torch.equal(ev.input_ids, ev2.input_ids) and torch.equal(tr.input_ids, tr2.input_ids)
    assert not torch.equal(ex.split(0.1, seed=4)[1].input_ids, ev.input_ids)
    assert len(ex.split(0.0, seed=3)[1]) == 0


def test_batch_plan_same_seed_same_order() -> None:
    a, b = BatchPlan(100, 4, 2, 2, seed=7), BatchPlan(100, 4, 2, 2, seed=7)
    c = BatchPlan(100, 4, 2, 2, seed=8)
    order = lambda p: [p.indices(s, m, r).tolist() for s in range(5) for m in range(2) for r in range(2)]  # noqa: E731
    assert order(a) == order(b)
    assert order(a) != order(c)
    assert all(len(ix) == 4 for ix in order(a))


def test_batch_plan_one_epoch_two_ranks_grad_accum() -> None:
    n, mb, accum, world = 103, 3, 2, 2
    plan = BatchPlan(n, mb, accum, world, seed=11)
    assert plan.global_batch == 12 and plan.steps_per_epoch == 8
    seen = [
        int(i)
        for s in range(plan.steps_per_epoch)
        for m in range(accum)
        for r in range(world)
        for i in plan.indices(s, m, r)
    ]
    assert len(seen) == len(set(seen)) == 8 * 12  # no example twice
    assert len(set(range(n)) - set(seen)) == n % 12  # all but the dropped remainder
    assert set(seen) <= set(range(n))
    # within a step, ranks and micro-batches get disjoint examples
    step0 = [set(plan.indices(0, m, r).tolist()) for m in range(accum) for r in range(world)]
    assert sum(map(len, step0)) == len(set().union(*step0)) == 12
    # the next epoch reshuffles
    nxt = [plan.indices(plan.steps_per_epoch + s, 0, 0).tolist() for s in range(3)]
    assert nxt != [plan.indices(s, 0, 0).tolist() for s in range(3)]
    assert plan.position(8) == {"epoch": 1, "step_in_epoch": 0}
    assert data.total_steps(0, 3, plan) == 24 and data.total_steps(5, 3, plan) == 5


def test_batch_plan_too_few_examples() -> None:
    plan = BatchPlan(7, 4, 1, 2, seed=0)
    with pytest.raises(ConfigError, match=r"training: 7 training examples, fewer than one global batch of 8"):
        data.check_plan(plan, "training")


def test_batch_plan_grouped_by_length() -> None:
    """data.group_by_length: each example once per epoch as before, micro-batches of similar length
    (less padding once cut to their longest), the same global batches on any split of it."""
    n, gen = 700, torch.Generator().manual_seed(3)
    lengths = torch.randint(10, 500, (n,), generator=gen)
    plain, grouped = BatchPlan(n, 4, 2, 2, seed=5), BatchPlan(n, 4, 2, 2, seed=5, lengths=lengths)
    steps = plain.steps_per_epoch
    seen = lambda p: sorted(
        int(i)
        for s in range(steps)
        for m in range(2)
        for r in range(2)  # noqa: E731
        for i in p.indices(s, m, r)
    )
    assert seen(grouped) == seen(plain)  # the epoch's examples are the ungrouped plan's
    padded = lambda p: sum(
        4 * int(lengths[p.indices(s, m, r)].max())
        for s in range(steps)  # noqa: E731
        for m in range(2)
        for r in range(2)
    )
    assert padded(grouped) < 0.8 * padded(plain)
    resplit = BatchPlan(n, 8, 2, 1, seed=5, lengths=lengths)  # global batch 16 again, on one rank
    for s in (0, 7, steps - 1):
        two = {int(i) for m in range(2) for r in range(2) for i in grouped.indices(s, m, r)}
        assert two == {int(i) for m in range(2) for i in resplit.indices(s, m, 0)}
    again = BatchPlan(n, 4, 2, 2, seed=5, lengths=lengths)
    assert [again.indices(s, 1, 1).tolist() for s in range(5)] == [grouped.indices(s, 1, 1).tolist() for s in range(5)]
