"""Chat formats on the real SmolLM2 tokenizer and template: token ids and loss masks against a hand
rendering of ChatML, prefix-derived masks against `{% generation %}` markers, truncation, the mix,
eval_path and the token cache."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import AutoTokenizer

from dtrain import data
from dtrain.config.schema import DataConfig
from dtrain.data import IGNORE, chat
from dtrain.data.encode import describe
from dtrain.errors import ConfigError

SYSTEM = "You are terse."
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TURNS = [
    ("system", SYSTEM),
    ("user", "What is 2+2?"),
    ("assistant", "4."),
    ("user", "And times three?"),
    ("assistant", "Twelve, since 4 x 3 = 12."),
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def hand(tok, turns) -> tuple[list[int], list[int]]:
    """ChatML by hand: <|im_start|>role\\ncontent<|im_end|>\\n per turn, each piece tokenized on its own;
    labels on assistant content + <|im_end|> only (not the newline after it)."""
    ids, labels = [], []
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    for role, content in turns:
        head = [start] + tok(f"{role}\n", add_special_tokens=False)["input_ids"]
        body = tok(content, add_special_tokens=False)["input_ids"] + [end]
        learned = role == "assistant"
        ids += head + body + nl
        labels += [IGNORE] * len(head) + (body if learned else [IGNORE] * len(body)) + [IGNORE] * len(nl)
    return ids, labels


def one(tok, tmp_path, record, **kw) -> tuple[list[int], list[int]]:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [record])
    cfg = DataConfig(path=str(path), seq_len=kw.pop("seq_len", 256), **kw)
    enc = data.encode(cfg, data.load_records(cfg), tok)
    assert len(enc) == 1
    return enc.seqs[0]


def test_messages_multi_turn_with_system_equals_hand_rendering(tok, tmp_path) -> None:
    rec = {"messages": [{"role": r, "content": c} for r, c in TURNS]}
    ids, labels = one(tok, tmp_path, rec, format="messages")
    want_ids, want_labels = hand(tok, TURNS)
    assert ids == want_ids and labels == want_labels
    assert tok.decode([t for t in labels if t != IGNORE]) == "4.<|im_end|>Twelve, since 4 x 3 = 12.<|im_end|>"
    ids2, labels2 = one(tok, tmp_path, rec, format="messages", seq_len=len(ids))  # padded row = the same tokens
    ex = data.to_rows([(ids2, labels2)], DataConfig(seq_len=len(ids) + 3), tok)
    assert ex.input_ids[0, : len(ids)].tolist() == want_ids and ex.labels[0].tolist() == want_labels + [IGNORE] * 3


def test_sharegpt_equals_hand_rendering(tok, tmp_path) -> None:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    rec = {"conversations": [{"from": names[r], "value": c} for r, c in TURNS]}
    assert one(tok, tmp_path, rec, format="sharegpt") == hand(tok, TURNS)
    # configurable field, keys and role names
    rec = {"chat": [{"speaker": {"system": "sys", "user": "q", "assistant": "a"}[r], "text": c} for r, c in TURNS]}
    got = one(
        tok,
        tmp_path,
        rec,
        format="sharegpt",
        messages_field="chat",
        turn_keys=["speaker", "text"],
        role_map={"sys": "system", "q": "user", "a": "assistant"},
    )
    assert got == hand(tok, TURNS)


def test_alpaca_equals_hand_rendering(tok, tmp_path) -> None:
    rec = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    want = hand(
        tok, [("system", DEFAULT_SYSTEM), ("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")]
    )  # SmolLM2's template adds its default system turn
    assert one(tok, tmp_path, rec, format="alpaca") == want
    rec = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert one(tok, tmp_path, rec, format="alpaca") == hand(
        tok, [("system", DEFAULT_SYSTEM), ("user", "Say hi."), ("assistant", "Hi!")]
    )


MARKED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_prefix_spans_agree_with_generation_markers(tok) -> None:
    convs = [
        [{"role": r, "content": c} for r, c in TURNS],
        [
            {"role": "user", "content": " leading space"},
            {"role": "assistant", "content": "\nnewline first "},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "multi\nline\n\nanswer"},
        ],
    ]
    for messages in convs:
        ref = tok.apply_chat_template(
            messages, chat_template=MARKED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, learn = chat.encode_chat(tok, MARKED, messages)
        assert ids == ref["input_ids"]
        assert [int(m) for m in learn] == ref["assistant_masks"]
        assert sum(learn) > 0


def test_template_that_is_not_prefix_stable_is_rejected(tok, tmp_path) -> None:
    bad = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '|' + (messages|length|string) }}{% endfor %}"
    rec = {"messages": [{"role": r, "content": c} for r, c in TURNS[1:3]]}
    with pytest.raises(ConfigError, match="not a prefix"):
        one(tok, tmp_path, rec, format="messages", chat_template=bad)


def test_config_template_string_is_used(tok, tmp_path) -> None:
    rec = {"messages": [{"role": r, "content": c} for r, c in TURNS[1:3]]}
    ids, labels = one(tok, tmp_path, rec, format="messages", chat_template=MARKED)
    assert ids == hand(tok, TURNS[1:3])[0]  # MARKED is ChatML without a default system turn


# ---- truncation and nothing to learn ------------------------------------------------------------


def conv(n_words: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(["word"] * n_words)},
            {"role": "assistant", "content": "Short answer."},
        ]
    }


def test_truncation_modes(tok, tmp_path, caplog) -> None:
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [conv(3), conv(60), conv(4)])
    base = dict(path=str(path), format="messages", seq_len=40)
    with caplog.at_level(logging.INFO, logger="dtrain.data"):
        enc = data.encode(DataConfig(**base), data.load_records(DataConfig(**base)), tok)
    assert len(enc) == 2 and enc.counts["too_long"] == 1
    assert "3 records -> 2 examples; dropped 1 over seq_len" in describe(enc.counts)
    cfg = DataConfig(**base, truncation="truncate")
    enc = data.encode(cfg, data.load_records(cfg), tok)
    assert len(enc) == 3 and enc.counts["truncated"] == 1
    ids, learn = chat.encode_chat(tok, tok.chat_template, chat.to_messages(conv(60), cfg))
    assert enc.seqs[1][0] == ids[-40:]  # the last 40 tokens: the conversation's end, the answer whole
    assert [t for t in enc.seqs[1][1] if t != IGNORE] == [t for t, m in zip(ids, learn) if m]
    cfg = DataConfig(**base, truncation="error")
    with pytest.raises(
        ConfigError,
        match=r"record 1 has \d+ tokens, more than data.seq_len = 40 "
        r"\(data.truncation: error\)",
    ):
        data.encode(cfg, data.load_records(cfg), tok)


def test_no_labelled_token_anywhere_is_an_error(tok, tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [conv(60)] * 5)
    cfg = DataConfig(path=str(path), format="messages", seq_len=40)
    with pytest.raises(ConfigError) as e:
        data.encode(cfg, data.load_records(cfg), tok)
    assert str(e.value) == (
        f"data.path = '{path}': no example has a labelled token within data.seq_len = 40 "
        "(5 records -> 0 examples; dropped 5 over seq_len; data.truncation = drop)"
    )


def test_bad_conversations_are_skipped(tok, tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    write_jsonl(
        path,
        [
            conv(3),
            {"messages": []},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
            conv(2),
        ],
    )
    cfg = DataConfig(path=str(path), format="messages", seq_len=64)
    enc = data.encode(cfg, data.load_records(cfg), tok)
    assert len(enc) == 2 and enc.counts["bad_record"] == 3
    with pytest.raises(ConfigError, match=r"record 1 has a missing or empty 'messages'$"):
        data.encode(
            DataConfig(path=str(path), format="messages", seq_len=64, bad_records="error"), data.load_records(cfg), tok
        )
