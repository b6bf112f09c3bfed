"""Token ids and assistant labels of rendered chat texts without character offsets, tokenizing only
what is not template text, several pieces per call of the Rust tokenizer.

Why it gives the whole text's tokens. The tokenizer first cuts a text at its added tokens
(`<|im_start|>`, ...: leftmost-longest matches of their literal strings) and then tokenizes every
piece between them on its own (normalizer, pre-tokenizer and model work per piece). So the text's
ids are: per piece, its ids; per match, the added token's id. This module finds the same matches
with a regular expression (alternatives longest first = leftmost-longest), takes the ids of a piece
seen before from a cache (the template's literal pieces: the system prompt, the newlines between
turns) and puts the others together from their words' ids (words.py, for a byte-level BPE with
GPT-2's split, on plain ASCII) or tokenizes them, joined with a separator added token S: in the joined
text the only possible matches are the inserted S's and ones crossing a piece's edge (a piece holds
no match of its own), and a crossing match would swallow an S; so when the output holds exactly one
S id per separator, it is the pieces' ids with S's between. Else the pieces go one per text.

Why it gives the labels. For a byte-level BPE with no normalizer every token is a run of the text's
bytes, in order, so the cumulative byte lengths of the tokens are their byte offsets. A token is
learned when it overlaps an assistant span (chat.overlap_mask on character offsets: a token that
covers part of a multi-byte character counts as covering that character, which is the same test on
byte offsets because span edges are character boundaries). Tokenizers that do not have these
properties (a normalizer, a prefix space, offsets trimmed by a post-processor, an added token with
strip options or matched after normalizing) are not served here: `for_tokenizer` gives None.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import accumulate, pairwise

from dtrain.data import words

_CACHE_MAX = 4096  # pieces remembered per encoder: those seen twice in a batch (the template's)
_JOIN_CHARS = 256  # characters per tokenizer text: fewer texts, but long texts cost more per byte
_PRE_OK = {"ByteLevel", "Digits"}  # pre-tokenizers that keep every byte of the text, in order
_POST_OK = {None, "TemplateProcessing"}  # post-processors that do not trim offsets


_PLANS: dict[int, tuple] = {}  # id(backend) -> (backend, its added tokens, its Segmenter's fixed parts or None)


def for_tokenizer(backend) -> Segmenter | None:
    """A Segmenter (with an empty piece cache) for this Rust tokenizer, or None when the reasoning
    above does not hold for it. The checks read the whole vocabulary: done once per tokenizer (and
    again when tokens were added to it since)."""
    added = str(sorted(backend.get_added_tokens_decoder().items()))
    known = _PLANS.get(id(backend))
    if known is None or known[0] is not backend or known[1] != added:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        known = _PLANS[id(backend)] = (backend, added, _plan(backend))  # holding the backend keeps its id unique
    plan = known[2]
    return None if plan is None else Segmenter(backend, *plan)


def _plan(backend) -> tuple | None:
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    post = (spec.get("post_processor") or {}).get("type")
    model = spec.get("model") or {}
    if (
        spec.get("normalizer") is not None
        or post not in _POST_OK
        or model.get("type") != "BPE"
        or model.get("dropout") is not None
        or model.get("byte_fallback")
    ):
        return None
    if (
        not pres
        or any(p.get("type") not in _PRE_OK for p in pres)
        or not any(p.get("type") == "ByteLevel" for p in pres)
        or any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pres)
    ):
        return None
    added = spec.get("added_tokens") or []
    if not added or any(a["normalized"] or a["lstrip"] or a["rstrip"] or a["single_word"] for a in added):
        return None
    lengths = _byte_lengths(backend, added)
    sep = next((a for a in added if a["special"] and not _has_border(a["content"])), None)
    plain = pres == [pre] and pre.get("use_regex", True)  # ByteLevel alone, GPT-2's split: words.py applies
    return None if lengths is None or sep is None else (added, lengths, sep, {} if plain else None)


def _byte_lengths(backend, added: list[dict]) -> list[int] | None:
    """Bytes of the text each token id stands for: its vocabulary string has one byte-level
    character per byte; an added token stands for its content (and must be spelled so in the vocab)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    size = backend.get_vocab_size(with_added_tokens=True)
    lengths = [0] * size
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        if not set(token) <= alphabet:
            return None
        lengths[i] = len(token)
    for a in added:
        if a["id"] >= size or backend.id_to_token(a["id"]) != a["content"]:
            return None
        lengths[a["id"]] = len(a["content"].encode("utf-8"))
    return None if 0 in lengths else lengths


def _has_border(s: str) -> bool:
    """Whether a proper prefix of s is also its suffix (then an S could straddle an inserted S)."""
    return any(s[:k] == s[-k:] for k in range(1, len(s)))


class Segmenter:
    def __init__(self, backend, added: list[dict], lengths: list[int], sep: dict, words: dict | None) -> None:
        self.backend, self.lengths, self.words = backend, lengths, words
        self.ids = {a["content"]: a["id"] for a in added}
        contents = sorted(self.ids, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, contents)) + ")").split
        self.sep, self.sep_id = sep["content"], sep["id"]
        self.cache: dict[str, list[int]] = {}

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, as the tokenizer gives them without special tokens added."""
        parts = [self.split(t) for t in texts]  # [piece, match, piece, match, ..., piece]
        seen = Counter(p for ps in parts for p in ps[::2] if p)
        new = [p for p in seen if p not in self.cache]
        got = dict(zip(new, self._pieces(new)))
        for piece in new:
            if seen[piece] > 1 and len(self.cache) < _CACHE_MAX:
                self.cache[piece] = got[piece]
        out = []
        for ps in parts:
            ids: list[int] = []
            for k, p in enumerate(ps):
                if k % 2:
                    ids.append(self.ids[p])
                elif p:
                    ids += got[p] if p in got else self.cache[p]
            out.append(ids)
        return out

    def _pieces(self, pieces: list[str]) -> list[list[int]]:
        """Ids of each piece (no added-token match inside): by words (words.py) where that applies."""
        if self.words is None:
            return self._rust(pieces)
        split = [words.split(p) for p in pieces]
        missing = list(dict.fromkeys(w for ws in split if ws is not None for w in ws if w not in self.words))
        found = dict(zip(missing, self._rust(missing)))
        if len(self.words) < words.CACHE_MAX:
            self.words.update(found)
        rust = iter(self._rust([p for p, ws in zip(pieces, split) if ws is None]))
        out = []
        for ws in split:
            if ws is None:
                out.append(next(rust))
                continue
            ids: list[int] = []
            for w in ws:
                ids += found[w] if w in found else self.words[w]
            out.append(ids)
        return out

    def _rust(self, pieces: list[str]) -> list[list[int]]:
        """Ids of each piece (no added-token match inside), joined to texts of about _JOIN_CHARS."""
        groups: list[list[str]] = []
        size = _JOIN_CHARS
        for p in pieces:
            if size + len(p) > _JOIN_CHARS:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += len(p)
        encs = self.backend.encode_batch_fast([self.sep.join(g) for g in groups], add_special_tokens=False)
        out: list[list[int]] = []
        for g, enc in zip(groups, encs):
            ids = enc.ids
            cuts = [i for i, t in enumerate(ids) if t == self.sep_id]
            if len(cuts) != len(g) - 1:  # a match crossed a piece's edge: tokenize them apart
                out += [e.ids for e in self.backend.encode_batch_fast(g, add_special_tokens=False)]
                continue
            bounds = [-1] + cuts + [len(ids)]
            out += [ids[a + 1 : b] for a, b in pairwise(bounds)]
        return out

    def labels(self, text: str, ids: list[int], spans: list[tuple[int, int]], ignore: int) -> list[int] | None:
        """ids where a token overlaps a span, else `ignore`; None when the tokens' bytes do not add
        up to the text's (then the offsets path decides)."""
        ends = list(accumulate(map(self.lengths.__getitem__, ids)))
        if text.isascii():
            total, byte_at = len(text), (lambda x: x)
        else:
            total, byte_at = len(text.encode("utf-8")), (lambda x: len(text[:x].encode("utf-8")))
        if (ends[-1] if ends else 0) != total:
            return None
        out = [ignore] * len(ids)
        for start, end in spans:
            if end <= start:
                continue
            # tokens with end > start and (start of token = end of the one before) < end
            i, j = bisect_right(ends, byte_at(start)), bisect_left(ends, byte_at(end)) + 1
            out[i:j] = ids[i:j]
        return out
