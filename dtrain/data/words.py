"""GPT-2's pre-tokenizer split in Python, for texts of plain ASCII, so that a byte-level BPE's ids of
a text can be put together from a cache of its words' ids (segments.py).

The Rust ByteLevel pre-tokenizer (use_regex) cuts a text at the matches of GPT-2's pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
(every character is in some match) and the BPE model tokenizes each match on its own; so the
text's ids are the concatenation of its words' ids, and a word's ids are those of the word
tokenized alone (alone, the pattern's first match is the whole word: each alternative that made
it in context matches it whole again, and a whitespace run at the end of a text is taken whole by
`\\s+(?!\\S)`). Python's `re` and Oniguruma are both backtracking engines with ordered alternation
and the same lookahead, so they cut alike where the character classes agree; that is certain on
the printable ASCII characters and tab, newline, carriage return (letters A-Za-z, digits 0-9,
whitespace space/tab/newline/return), and only texts made of those are split here: any other
(non-ASCII, form feed, other control characters) is left to the Rust tokenizer.
"""

from __future__ import annotations

import re

CACHE_MAX = 200_000  # words remembered per tokenizer and process (a bounded memory)
_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", re.ASCII)
_UNSAFE = re.compile(r"[^\x20-\x7e\t\n\r]")


def split(text: str) -> list[str] | None:
    """The pre-tokenizer's words of `text`, or None when it holds a character outside the safe set."""
    if _UNSAFE.search(text):
        return None
    return _PATTERN.findall(text)
