"""Records -> token sequences with their labels, per format, with data.truncation applied.

Every example is `(ids, labels)` of its own length (labels IGNORE where no loss). Formats:
`text` (documents joined with EOS, cut into full seq_len rows, every token learned), `instruction`
(prompt + response + EOS; loss on response + EOS), `alpaca` (a user turn and an assistant turn
through the chat template when there is one, else like `instruction` with prompt "instruction
[\\n\\ninput]\\n\\n"), `messages` and `sharegpt` (the chat template; loss on assistant turns).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dtrain.config import DataConfig
from dtrain.data import chat, preference
from dtrain.data.ragged import Ragged, RaggedBuilder
from dtrain.data.records import record_problem, required_fields
from dtrain.data.rows import IGNORE
from dtrain.errors import ConfigError

log = logging.getLogger("dtrain.data")
REASONS = ("bad_record", "too_long", "no_labels", "truncated", "no_room", "prompt_cut")
PROGRESS_MIN = 2000  # records: show a progress bar from this many on (rank 0)


@dataclass
class Encoded:
    """One dataset's examples (ragged) and what happened to its records."""

    examples: Ragged
    counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def seqs(self) -> list[tuple[list[int], list[int]]]:
        """The examples as (ids, labels) lists (small inspections; training reads `examples`)."""
        return self.examples.seqs()


def encode(cfg: DataConfig, records: list[dict], tokenizer, progress: bool = False) -> Encoded:
    """Tokenize records in the configured format; skip (or reject) bad records; apply truncation."""
    txt = Path(cfg.path).suffix.lower() == ".txt"
    template = chat.template_of(cfg, tokenizer) if cfg.format != "instruction" else None
    if cfg.format in ("messages", "sharegpt") and template is None:
        raise ConfigError(f"data.path = '{cfg.path}': data.format = {cfg.format} needs a chat template; the "
                          "tokenizer has none: set data.chat_template or data.tokenizer")
    out, first_bad = Encoded(Ragged.from_seqs([]), Counter(records=len(records))), None
    kept = RaggedBuilder()
    bar = tqdm(records, desc=f"tokenize {Path(cfg.path).name}", disable=not progress or len(records) < PROGRESS_MIN,
               leave=False, dynamic_ncols=True)
    docs = []
    if cfg.format == "preference":  # pairs: dtrain/data/preference.py
        first_bad = _encode_pairs(kept, out.counts, bar, cfg, tokenizer, template)
    for i, rec in enumerate(bar if cfg.format != "preference" else []):
        if txt:
            rec = {cfg.text_field: rec.get("text")}
        problem = record_problem(rec, cfg)
        if problem is None and cfg.format == "text":
            docs.append(rec[cfg.text_field])
            continue
        pair = _example(rec, cfg, tokenizer, template) if problem is None else problem
        if isinstance(pair, str):
            if cfg.bad_records == "error":
                raise ConfigError(f"data.path = '{cfg.path}': record {i} has {pair}")
            out.counts["bad_record"] += 1
            first_bad = i if first_bad is None else first_bad
            continue
        _keep(kept, out.counts, pair, cfg, i)
    bar.close()
    if out.counts["bad_record"] and cfg.format != "preference":  # pairs: _encode_pairs says why
        log.warning("data: skipped %d record(s) with a missing or empty field (first: record %d)",
                    out.counts["bad_record"], first_bad)
    if cfg.format == "text":
        for ids, labels in _text_rows(docs, cfg, tokenizer):
            kept.add(ids, labels)
    out.examples = kept.build()
    if not len(out.examples):
        raise ConfigError(_nothing_to_learn(cfg, out.counts))
    out.counts["examples"] = len(out.examples) // (2 if cfg.format == "preference" else 1)
    return out


def _encode_pairs(kept: RaggedBuilder, counts: Counter, records, cfg: DataConfig, tokenizer,
                  template: str | None) -> int | None:
    """Preference records -> (chosen, rejected) examples, consecutive in `kept`; the first bad record."""
    first_bad = None
    for i, rec in enumerate(records):
        found = preference.pair(rec, cfg, tokenizer, template)
        if isinstance(found, str):
            if cfg.bad_records == "error":
                raise ConfigError(f"data.path = '{cfg.path}': record {i} has {found}")
            if first_bad is None:
                log.warning("data: skipping bad preference records (first: record %d, %s)", i, found)
                first_bad = i
            counts["bad_record"] += 1
            continue
        fitted, what = preference.fit(found, cfg, i)
        if what:
            counts[what] += 1
        if fitted is not None:
            for ids, labels in fitted:
                kept.add(ids, labels)
    return first_bad


def _example(rec: dict, cfg: DataConfig, tokenizer, template: str | None) -> tuple[list[int], list[int]] | str:
    """(ids, labels) of one record, or why the record is unusable."""
    if cfg.format in ("messages", "sharegpt") or (cfg.format == "alpaca" and template is not None):
        messages = chat.to_messages(rec, cfg)
        if isinstance(messages, str):
            return messages
        ids, learn = chat.encode_chat(tokenizer, template, messages)
        return ids, [t if m else IGNORE for t, m in zip(ids, learn)]
    if cfg.format == "alpaca":
        instr, inp, out = (rec.get(f) for f in cfg.alpaca_fields)
        prompt, response = (instr if not (isinstance(inp, str) and inp.strip()) else f"{instr}\n\n{inp}") + "\n\n", out
    else:
        prompt, response = rec[cfg.prompt_field], rec[cfg.response_field]
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + r, [IGNORE] * len(p) + r


def _keep(kept: RaggedBuilder, counts: Counter, pair: tuple[list[int], list[int]], cfg: DataConfig, i: int) -> None:
    """Apply data.truncation, then keep the example if a token of it (after the first) is learned."""
    ids, labels = pair
    if len(ids) > cfg.seq_len:
        if cfg.truncation == "error":
            raise ConfigError(f"data.path = '{cfg.path}': record {i} has {len(ids)} tokens, more than "
                              f"data.seq_len = {cfg.seq_len} (data.truncation: error)")
        if cfg.truncation == "drop":
            counts["too_long"] += 1
            return
        ids, labels = ids[-cfg.seq_len:], labels[-cfg.seq_len:]  # keep the end: the last answer
        counts["truncated"] += 1
    if all(v == IGNORE for v in labels[1:]):  # the first token is never a target
        counts["no_labels"] += 1
        return
    kept.add(ids, labels)


def _text_rows(docs: list[str], cfg: DataConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Join documents with EOS and cut the stream into full sequences of seq_len (all learned)."""
    stream: list[int] = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n, L = len(stream) // cfg.seq_len, cfg.seq_len
    if n == 0 and docs:
        raise ConfigError(f"data.path = '{cfg.path}': {len(stream)} tokens, fewer than data.seq_len = {L}")
    return [(stream[k * L:(k + 1) * L], stream[k * L:(k + 1) * L]) for k in range(n)]


def _nothing_to_learn(cfg: DataConfig, counts: Counter) -> str:
    if counts["bad_record"] == counts["records"]:
        fields = required_fields(cfg) or ([cfg.prompt_field, cfg.chosen_field, cfg.rejected_field]
                                          if cfg.format == "preference" else
                                          [cfg.messages_field or chat.DEFAULT_FIELD.get(cfg.format, "?")])
        return f"data.path = '{cfg.path}': no usable records (fields: {', '.join(fields)})"
    return (f"data.path = '{cfg.path}': no example has a labelled token within data.seq_len = {cfg.seq_len} "
            f"({describe(counts)}; data.truncation = {cfg.truncation})")


def describe(counts: Counter) -> str:
    """'270 records: 12 examples; dropped 250 over seq_len, 8 with no labelled token; ...'"""
    parts = [f"{counts['records']} records -> {counts['examples']} examples"]
    dropped = [f"{counts[k]} {what}" for k, what in (("too_long", "over seq_len"), ("no_labels", "with no labelled "
               "token"), ("bad_record", "bad record(s)"), ("no_room", "whose completions leave no room for "
               "the prompt")) if counts[k]]
    if dropped:
        parts.append("dropped " + ", ".join(dropped))
    if counts["truncated"]:
        parts.append(f"truncated {counts['truncated']} (kept their last seq_len tokens)")
    if counts["prompt_cut"]:
        parts.append(f"cut {counts['prompt_cut']} prompt(s) to data.max_prompt_tokens (kept their end)")
    return "; ".join(parts)
