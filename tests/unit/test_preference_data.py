"""Preference pairs on the real SmolLM2 tokenizer and template: the scored tokens of chosen and
rejected are exactly the labels SFT (data.format: messages) gives that assistant turn; TRL's record
shapes (string or messages) and configurable field names; truncation keeps the prompt's end and
both completions whole, counted per reason; bad records are counted or rejected in one line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from dtrain import data
from dtrain.config.schema import DataConfig
from dtrain.data import IGNORE, preference
from dtrain.data.encode import describe
from dtrain.errors import ConfigError
from dtrain.model.tokenizer import build_tokenizer

SYSTEM = {"role": "system", "content": "Answer briefly."}
PROMPT = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times three?"},
]
CHOSEN, REJECTED = "Twelve.", "Seven, I believe."


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def encode(tok, tmp_path, records, **kw):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(path=str(path), format=kw.pop("format", "preference"), seq_len=kw.pop("seq_len", 256), **kw)
    return data.encode(cfg, data.load_records(cfg), tok)


def sft_last_turn(tok, tmp_path, messages):
    """SFT's (ids, labels) of the conversation, labels kept on its last assistant turn only."""
    ((ids, labels),) = encode(tok, tmp_path, [{"messages": messages}], format="messages").seqs
    first_of_last = max(i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    return ids, [IGNORE] * first_of_last + labels[first_of_last:]


def test_scored_tokens_are_sfts_labels_of_that_turn(tok, tmp_path):
    rec = {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "assistant", "content": REJECTED}],
    }
    enc = encode(tok, tmp_path, [rec])
    assert len(enc.seqs) == 2 and enc.counts["examples"] == 1
    for got, text in zip(enc.seqs, (CHOSEN, REJECTED)):
        want = sft_last_turn(tok, tmp_path, PROMPT + [{"role": "assistant", "content": text}])
        assert got == want
        scored = [t for t in got[1] if t != IGNORE]
        assert tok.decode(scored) == text + "<|im_end|>"  # content + end of turn, the earlier "4." not scored


def test_trl_shapes_and_field_names(tok, tmp_path):
    """A string prompt is a user turn, string completions assistant turns; field names are configurable."""
    conv = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    plain = {"q": "Hi?", "good": "Hello.", "bad": "Go away."}
    a = encode(tok, tmp_path, [conv]).seqs
    b = encode(tok, tmp_path, [plain], prompt_field="q", chosen_field="good", rejected_field="bad").seqs
    assert a == b


def test_without_a_template_like_instruction(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the hen is red. the owl flies at night. " * 50)
    tok = build_tokenizer(corpus)
    (ic, lc), (ir, lr) = encode(tok, tmp_path, [{"prompt": "Q: colour? ", "chosen": "red", "rejected": "blue"}]).seqs
    p = tok("Q: colour? ", add_special_tokens=False)["input_ids"]
    assert ic[: len(p)] == ir[: len(p)] == p and lc[: len(p)] == [IGNORE] * len(p)
    assert lc[len(p) :] == tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_keeps_the_prompt_end_and_both_completions(tok, tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 60 + "What is 2+2?"}]
    rec = {"prompt": long_prompt, "chosen": "4.", "rejected": "Five, surely."}
    full = encode(tok, tmp_path, [rec]).seqs
    (fc, flc), (fr, flr) = full
    seq_len = max(len(fc), len(fr)) - 20
    cut = encode(tok, tmp_path, [rec], seq_len=seq_len, truncation="truncate")
    (ic, lc), (ir, lr) = cut.seqs
    assert max(len(ic), len(ir)) == seq_len and cut.counts["truncated"] == 1
    assert ic == fc[20:] and ir == fr[20:] and lc == flc[20:] and lr == flr[20:]  # same start cut from both sides
    short = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    dropped = encode(tok, tmp_path, [rec, rec | {"chosen": "Four."}, short], seq_len=seq_len).counts
    assert dropped["too_long"] == 2 and "dropped 2 over seq_len" in describe(dropped)
    kept = encode(tok, tmp_path, [rec], max_prompt_tokens=10)
    (mc, mlc), _ = kept.seqs
    assert kept.counts["prompt_cut"] == 1 and mc[:10] == fc[len(fc) - len(mc) :][:10]
    assert preference._prompt_len(mlc) == 10  # prompt tokens before the first scored one
    long_answer = {"prompt": "Hi?", "chosen": "yes " * 80, "rejected": "no"}
    counts = encode(tok, tmp_path, [short, long_answer], seq_len=60, truncation="truncate").counts
    assert counts["no_room"] == 1 and "1 whose completions leave no room for the prompt" in describe(counts)


def test_bad_records_counted_or_one_line(tok, tmp_path):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    missing = {"prompt": "Hi?", "chosen": "Hello."}
    same = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}
    enc = encode(tok, tmp_path, [good, missing, same])
    assert enc.counts["bad_record"] == 2 and len(enc.seqs) == 2
    with pytest.raises(ConfigError, match=r"record 1 has a missing or empty 'rejected'"):
        encode(tok, tmp_path, [good, missing], bad_records="error")
    with pytest.raises(ConfigError, match=r"record 1 has identical 'chosen' and 'rejected'"):
        encode(tok, tmp_path, [good, same], bad_records="error")
    with pytest.raises(ConfigError, match=r"no usable records \(fields: prompt, chosen, rejected\)"):
        encode(tok, tmp_path, [missing, same])


def test_pairs_are_grouped_and_rows_interleaved(tok, tmp_path):
    recs = [{"prompt": f"What is {i}?", "chosen": f"{i}.", "rejected": f"{i + 1}."} for i in range(3)]
    enc = encode(tok, tmp_path, recs)
    seqs = enc.seqs
    pairs = [(seqs[k], seqs[k + 1]) for k in range(0, len(seqs), 2)]
    rows = data.rows.pair_rows(enc.examples, 64, tok.pad_token_id)
    assert len(rows) == 3
    import torch

    batch = rows.take(torch.tensor([2, 0]))
    assert batch["input_ids"].shape[0] == 4  # cut to the longest of the four rows
    assert batch["input_ids"][0, : len(pairs[2][0][0])].tolist() == pairs[2][0][0]
    assert batch["input_ids"][1, : len(pairs[2][1][0])].tolist() == pairs[2][1][0]
    assert batch["input_ids"][2, : len(pairs[0][0][0])].tolist() == pairs[0][0][0]
