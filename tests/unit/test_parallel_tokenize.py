"""Tokenization at scale on the real SmolLM2 tokenizer and chat template: batched rendering and
tokenizing give the per-record path's tokens; 1 and 2 worker processes writing shards give the same
cache entry; the entry is a valid safetensors file, read back memory-mapped."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dtrain.config.schema import DataConfig
from dtrain.data import IGNORE, cache, chat, encode, load_records, parallel
from dtrain.errors import ConfigError
from tests.helpers import REPO

DATES = REPO / "dtrain" / "assets" / "dates_train.jsonl"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def records(tmp_path):
    """The 400 date conversations, three bad records among them, and a two-turn-pair conversation."""
    rows = [json.loads(line) for line in DATES.read_text().splitlines()]
    two = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye now."},
        ]
    }
    rows = (
        rows[:50]
        + [{"messages": []}, two]
        + rows[50:300]
        + [{"messages": [{"role": "user", "content": "x"}]}]
        + rows[300:]
        + [{"messages": None}]
    )
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mapped(t: torch.Tensor, path) -> bool:
    """Whether tensor t's memory lies in a mapping of file `path` (/proc/self/maps)."""
    at = t.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if rest and rest[-1] == str(path) and lo <= at < hi:
            return True
    return False


def test_batched_workers_and_shards_give_the_per_record_tokens(tok, records, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(records), format="messages", seq_len=96)
    recs = load_records(cfg)
    ref = []  # one conversation at a time, as dtrain tokenized before batching
    for r in recs:
        m = chat.to_messages(r, cfg)
        if not isinstance(m, str):
            ids, learn = chat.encode_chat(tok, tok.chat_template, m)
            ref.append((ids, [t if k else IGNORE for t, k in zip(ids, learn)]))
    serial = encode(cfg, recs, tok)
    assert serial.seqs == ref and len(ref) == 401 and serial.counts["bad_record"] == 3
    monkeypatch.setattr(parallel, "CHUNK", 37)  # 11 shards; forked workers inherit it
    entries = []
    for procs in (1, 2):
        c = DataConfig(**{**cfg.__dict__, "num_proc": procs, "cache_dir": str(tmp_path / f"c{procs}")})
        (got,) = cache.build(tmp_path / f"c{procs}", "k", [c], tok, progress=False)
        for name in ("ids", "labels", "offsets"):
            assert torch.equal(getattr(got.examples, name), getattr(serial.examples, name)), (procs, name)
        assert got.counts == serial.counts
        entries.append(tmp_path / f"c{procs}" / "k" / "tokens.safetensors")
        assert _mapped(got.examples.ids, entries[-1]) and _mapped(got.examples.offsets, entries[-1])
        assert sorted(p.name for p in (tmp_path / f"c{procs}").iterdir()) == ["k"]  # no shard left behind
    assert entries[0].read_bytes() == entries[1].read_bytes()
    plain = load_file(str(entries[0]))  # the streamed file is an ordinary safetensors file
    assert torch.equal(plain["0.ids"], serial.examples.ids) and torch.equal(plain["0.offsets"], serial.examples.offsets)


def test_a_bad_record_in_a_worker_is_one_line_and_nothing_is_written(tok, records, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK", 64)
    cfg = DataConfig(path=str(records), format="messages", seq_len=96, num_proc=2, bad_records="error")
    with pytest.raises(ConfigError, match=f"data.path = '{records}': record 50 has a missing or empty 'messages'"):
        cache.build(tmp_path / "c", "k", [cfg], tok, progress=False)
    assert list((tmp_path / "c").iterdir()) == []


def test_training_rows_read_the_cache_memory_mapped(tok, records, tmp_path):
    """One dataset with data.eval_path: the training rows are views of the mapped cache file."""
    from dtrain import data

    cfg = DataConfig(
        path=str(records), format="messages", seq_len=96, eval_path=str(DATES), cache_dir=str(tmp_path / "c")
    )
    first = data.prepare(cfg, tok, seed=0)
    second = data.prepare(cfg, tok, seed=0)
    (entry,) = (tmp_path / "c").iterdir()
    assert second.cache_hit and _mapped(second.train.tokens.ids, entry / "tokens.safetensors")
    assert torch.equal(first.train.input_ids, second.train.input_ids) and len(second.train) == 401


def _odd_conversations(n: int, seed: int = 1) -> list[list[dict]]:
    """Contents that test span edges: multi-byte characters split into byte tokens, leading and
    trailing whitespace (which a trimming template changes), tabs, newlines, one-character turns."""
    import random

    rng = random.Random(seed)
    odd = [
        "héllo wörld ✨🦉",
        "  leading",
        "trailing   ",
        "tabs\tand\nnewlines\n\n",
        "日本語のテキスト",
        "x",
        "🦉🦉🦉 ok",
        "The date is 2024-03-05.",
        "a <|im_end|> inside",
        "ends in <|im",
        "<|endoftext|>x",
    ]
    convs = []
    for _ in range(n):
        m = [{"role": "system", "content": rng.choice(odd)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            m += [
                {"role": "user", "content": f"{rng.choice(odd)} {rng.choice(odd)}"},
                {"role": "assistant", "content": rng.choice(odd) + rng.choice(odd)},
            ]
        convs.append(m)
    return convs


def _chat_assets(tmp_path) -> list[list[dict]]:
    """The repository's chat assets and 200 of bench/tokenize_scale.py's generated conversations."""
    from bench.tokenize_scale import make_data

    make_data(tmp_path / "bench.jsonl", 200)
    files = [REPO / "dtrain" / "assets" / "tiny_messages.jsonl", DATES, tmp_path / "bench.jsonl"]
    return [json.loads(line)["messages"] for f in files for line in f.read_text().splitlines()]


@pytest.mark.parametrize("template", ["smollm2", "gemma3"])
def test_placeholder_spans_give_the_prefix_spans_and_labels(tok, template, tmp_path, monkeypatch):
    """The batched path (one rendering per conversation, spans mapped from its shape's placeholder
    rendering; ids by segments.py: template pieces from a cache, the others several to a Rust call,
    labels from the tokens' byte lengths) gives per-record chat.encode_chat's ids and labels, on
    SmolLM2's template (which writes contents as they are: every conversation takes the shape
    path) and on Gemma's (which trims them: the conversations whose contents have edge whitespace
    take the prefix path); so does the offsets path that segments.py falls back to."""
    from dtrain.data.batched import BatchEncoder
    from dtrain.model import templates

    text = tok.chat_template if template == "smollm2" else templates.GEMMA3
    convs = _odd_conversations(300) + _chat_assets(tmp_path)
    want = []
    for m in convs:
        ids, learn = chat.encode_chat(tok, text, m)
        want.append((ids, [t if k else IGNORE for t, k in zip(ids, learn)]))
    offsets_path = []
    counted = BatchEncoder._label_offsets
    monkeypatch.setattr(
        BatchEncoder,
        "_label_offsets",
        lambda self, texts, spans: offsets_path.append(len(texts)) or counted(self, texts, spans),
    )
    for segments_path in (False, True):
        enc = BatchEncoder(DataConfig(path="unused.jsonl", format="messages"), tok, text)
        assert enc.segmenter is not None  # SmolLM2's tokenizer is a byte-level BPE segments.py serves
        enc.segmenter = enc.segmenter if segments_path else None
        got = [x for i in range(0, len(convs), 64) for x in enc.encode([{"messages": m} for m in convs[i : i + 64]])]
        assert got == want, segments_path
    assert sum(offsets_path) == len(convs)  # the segments path needed the offsets path for no text
    if template == "smollm2":  # the template's own pieces are taken from the cache
        system = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        assert {"\n", system} <= set(enc.segmenter.cache)
    assert sum(1 for _, labels in got for t in labels if t != IGNORE) > 3000  # the spans are not empty
    shapes = list(enc.shapes.values())
    assert len(shapes) >= 6 and all(s is not None for s in shapes)  # both templates write a placeholder once
    filled = sum(
        chat.skeleton.fill(enc.shapes[chat.skeleton.shape_key(m)], [x["content"] for x in m])
        == chat.render(tok, text, m)
        for m in convs
    )
    assert filled == len(convs) if template == "smollm2" else 0 < filled < len(convs), filled


# whitespace runs, contractions, digits, added tokens and parts of them, non-ASCII and control characters
TRICKY_PIECES = [
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    "'",
    "'s",
    "'re",
    "'S",
    "Hello",
    "x",
    "12",
    ".",
    "!?",
    "<",
    "|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im",
    "Q",
    " Q",
    "\x0b",
    "\x0c",
    "é",
    "日",
    "🦉",
    "\x1f",
    "don't",
    " ' ",
    "   x",
    "~",
]


def test_segments_give_the_rust_ids_on_tricky_text(smollm2_dir):
    """segments.py's ids equal the Rust tokenizer's on random strings of tricky pieces (whitespace
    runs, contractions, digits, added tokens and parts of them, non-ASCII and control characters:
    words.py's split where the text is safe ASCII, Rust elsewhere). With an added token that a
    piece's end and the separator form ('Q<|endoftext|>'), which swallows the separator: those
    pieces are tokenized one per text."""
    import random

    from tokenizers import AddedToken, Tokenizer

    from dtrain.data import segments

    backend = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("Q<|endoftext|>", special=True, normalized=False)])
    seg = segments.for_tokenizer(backend)
    assert seg is not None and seg.sep == "<|endoftext|>" and seg.words is not None
    rng = random.Random(0)
    texts = ["".join(rng.choice(TRICKY_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    texts += [f"<|im_start|>user\nwhy Q<|im_end|>\n<|im_start|>assistant\nsay {k} Q<|im_end|>\n" for k in range(20)]
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert [ids for i in range(0, len(texts), 256) for ids in seg.encode(texts[i : i + 256])] == want
    assert backend.token_to_id("Q<|endoftext|>") in {t for ids in want for t in ids}
    backend.add_special_tokens([AddedToken("<zz>", special=True, normalized=False)])  # checked again, not stale
    assert segments.for_tokenizer(backend).encode(["a<zz>b"]) == [
        backend.encode("a<zz>b", add_special_tokens=False).ids
    ]
