"""Records -> (ids, labels) a batch at a time: the chat renderings of a batch in one call, the
texts of a batch tokenized in one call of the Rust tokenizer. Same tokens as one record at a time
(chat.encode_chat, tokenizer(...)): the renderer is the one `apply_chat_template` calls, with the
same arguments; the tokenizer is the backend `tokenizer(...)` calls, used only when it carries no
truncation or padding of its own (else the per-call path is taken)."""

from __future__ import annotations

from dtrain.config.schema import DataConfig
from dtrain.data import chat, segments
from dtrain.data.records import record_problem

IGNORE = -100  # as rows.IGNORE (imported by value: workers need no torch)
Pair = tuple[list[int], list[int]]


class BatchEncoder:
    """(ids, labels), or why the record is unusable, for each record of a batch."""

    def __init__(self, cfg: DataConfig, tokenizer, template: str | None) -> None:
        self.cfg, self.tokenizer, self.template = cfg, tokenizer, template
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and backend.truncation is None and backend.padding is None
        self.backend = backend if plain else None
        self.segmenter = segments.for_tokenizer(backend) if plain else None  # ids without offsets
        self.shapes: dict = {}  # conversation shape -> its placeholder rendering (chat.assistant_spans_batch)
        self.chat = cfg.format in ("messages", "sharegpt") or (cfg.format == "alpaca" and template is not None)

    def encode(self, records: list[dict]) -> list[Pair | str]:
        if self.chat:
            return self._chat(records)
        out: list[Pair | str] = [record_problem(rec, self.cfg) or "" for rec in records]
        good = [i for i, p in enumerate(out) if not p]
        prompts, responses = zip(*(self._prompt_response(records[i]) for i in good)) if good else ((), ())
        p_ids, r_ids = self._ids(list(prompts)), self._ids(list(responses))
        eos = self.tokenizer.eos_token_id
        for i, p, r in zip(good, p_ids, r_ids):
            out[i] = (p + r + [eos], [IGNORE] * len(p) + r + [eos])
        return out

    def _prompt_response(self, rec: dict) -> tuple[str, str]:
        c = self.cfg
        if c.format == "alpaca":
            user, out = chat.alpaca_turns(rec, c)
            return user + "\n\n", out
        return rec[c.prompt_field], rec[c.response_field]

    def _chat(self, records: list[dict]) -> list[Pair | str]:
        out: list[Pair | str] = []
        convs = []
        for rec in records:
            problem = record_problem(rec, self.cfg)
            messages = problem or chat.to_messages(rec, self.cfg)
            out.append(messages if isinstance(messages, str) else "")
            if not isinstance(messages, str):
                convs.append(messages)
        rendered = chat.assistant_spans_batch(self.tokenizer, self.template, convs, self.shapes)
        labelled = iter(self._label([text for text, _ in rendered], [spans for _, spans in rendered]))
        return [o or next(labelled) for o in out]

    def _label(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Pair]:
        """(ids, labels) of each text: the ids of tokens overlapping its spans are learned."""
        if self.segmenter is not None:
            return self._label_segments(texts, spans)
        return self._label_offsets(texts, spans)

    def _label_offsets(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Pair]:
        if self.backend is None:
            return [
                (ids, [t if m else IGNORE for t, m in zip(ids, chat.overlap_mask(offsets, s))])
                for (ids, offsets), s in zip(self._tokenize(texts), spans)
            ]
        out = []
        for enc, s in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans):
            ids = enc.ids
            ranges = token_ranges(enc, len(ids), s)
            if ranges is None:  # a span edge on a character no token covers: compare every token
                learn = chat.overlap_mask(enc.offsets, s)
                out.append((ids, [t if m else IGNORE for t, m in zip(ids, learn)]))
                continue
            labels = [IGNORE] * len(ids)
            for i, j in ranges:
                labels[i:j] = ids[i:j]
            out.append((ids, labels))
        return out

    def _label_segments(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Pair]:
        """_label by segments.py (no offsets); a text whose token bytes do not add up takes the offsets path."""
        out: list = []
        for text, ids, s in zip(texts, self.segmenter.encode(texts), spans):
            labels = self.segmenter.labels(text, ids, s, IGNORE)
            out.append((ids, labels) if labels is not None else None)
        rest = [k for k, o in enumerate(out) if o is None]
        for k, got in zip(rest, self._label_offsets([texts[k] for k in rest], [spans[k] for k in rest])):
            out[k] = got
        return out

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.segmenter is not None:
            return self.segmenter.encode(texts)
        return [ids for ids, _ in self._tokenize(texts)]

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text, without special tokens."""
        if not texts:
            return []
        if self.backend is not None:
            return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))


def token_ranges(enc, n: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """[i, j) token ranges overlapping each character span, as chat.overlap_mask decides (a token
    is learned when it overlaps a span), found from the span's edges instead of every token's
    offsets; None when an edge lies on a character no token covers."""
    out = []
    for start, end in spans:
        if end <= start:
            continue
        i, j = enc.char_to_token(start), enc.char_to_token(end - 1)
        if i is None or j is None:
            return None
        while i > 0 and enc.token_to_chars(i - 1)[1] > start:  # several tokens share a character (bytes)
            i -= 1
        while j + 1 < n and enc.token_to_chars(j + 1)[0] < end:
            j += 1
        out.append((i, j + 1))
    return out
