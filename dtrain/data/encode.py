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

from dtrain.config.schema import DataConfig
from dtrain.data import chat, locate, preference
from dtrain.data.batched import BatchEncoder
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


BATCH = 256  # records rendered and tokenized per call


@dataclass
class Part:
    """The examples of a run of consecutive records (a chunk, or the whole dataset), torch-free."""

    kept: RaggedBuilder = field(default_factory=RaggedBuilder)
    counts: Counter = field(default_factory=Counter)
    first_bad: int | None = None
    docs: list[str] = field(default_factory=list)  # format text: the documents, joined later


def template_for(cfg: DataConfig, tokenizer) -> str | None:
    template = chat.template_of(cfg, tokenizer) if cfg.format != "instruction" else None
    if cfg.format in ("messages", "sharegpt") and template is None:
        raise ConfigError(
            f"data.path = '{cfg.path}': data.format = {cfg.format} needs a chat template; the "
            "tokenizer has none: set data.chat_template or data.tokenizer"
        )
    return template


def encode(cfg: DataConfig, records: list[dict], tokenizer, progress: bool = False) -> Encoded:
    """Tokenize records in the configured format; skip (or reject) bad records; apply truncation."""
    bar = tqdm(
        total=len(records),
        desc=f"tokenize {Path(cfg.path).name}",
        leave=False,
        dynamic_ncols=True,
        disable=not progress or len(records) < PROGRESS_MIN,
    )
    if cfg.format == "preference":  # pairs: dtrain/data/preference.py, one record at a time
        part = Part(counts=Counter(records=len(records)))
        part.first_bad = _encode_pairs(part.kept, part.counts, records, cfg, tokenizer, template_for(cfg, tokenizer))
        bar.update(len(records))
    else:
        part = encode_part(cfg, records, tokenizer, 0, bar.update)
    bar.close()
    return finish(cfg, part, tokenizer)


def encode_part(cfg: DataConfig, records: list[dict], tokenizer, start: int, advance=None) -> Part:
    """Records start, start+1, ... in batches; `advance(n)` after each batch (a progress bar)."""
    txt, part = locate.is_text(cfg.path), Part(counts=Counter(records=len(records)))
    encoder = BatchEncoder(cfg, tokenizer, template_for(cfg, tokenizer))
    for b in range(0, len(records), BATCH):
        batch = records[b : b + BATCH]
        if txt:
            batch = [rec if cfg.text_field in rec else {cfg.text_field: rec.get("text")} for rec in batch]
        if cfg.format == "text":  # documents are tokenized as one stream, after all records
            results = [record_problem(rec, cfg) for rec in batch]
            part.docs += [rec[cfg.text_field] for rec, problem in zip(batch, results) if problem is None]
        else:
            results = encoder.encode(batch)
        for j, res in enumerate(results):
            i = start + b + j
            if res is None:
                continue
            if isinstance(res, str):
                if cfg.bad_records == "error":
                    raise ConfigError(f"data.path = '{cfg.path}': record {i} has {res}")
                part.counts["bad_record"] += 1
                part.first_bad = i if part.first_bad is None else part.first_bad
            else:
                _keep(part.kept, part.counts, res, cfg, i)
        if advance is not None:
            advance(len(batch))
    return part


def finish(cfg: DataConfig, part: Part, tokenizer) -> Encoded:
    """The dataset's Encoded from its (merged) part: the skip warning, text rows, the empty check."""
    if cfg.format == "text":
        for ids, labels in _text_rows(part.docs, cfg, tokenizer):
            part.kept.add(ids, labels)
    out = Encoded(part.kept.build(), part.counts)
    report(cfg, out.counts, part.first_bad, len(out.examples))
    return out


def report(cfg: DataConfig, counts: Counter, first_bad: int | None, n_examples: int) -> None:
    """The skipped-records warning; nothing to learn is an error; counts["examples"] set."""
    if counts["bad_record"] and cfg.format != "preference":  # pairs: _encode_pairs says why
        log.warning(
            "data: skipped %d record(s) with a missing or empty field (first: record %d)",
            counts["bad_record"],
            first_bad,
        )
    if not n_examples:
        raise ConfigError(_nothing_to_learn(cfg, counts))
    counts["examples"] = n_examples // (2 if cfg.format == "preference" else 1)  # a pair is two examples


def _encode_pairs(
    kept: RaggedBuilder, counts: Counter, records, cfg: DataConfig, tokenizer, template: str | None
) -> int | None:
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


def _keep(kept: RaggedBuilder, counts: Counter, pair: tuple[list[int], list[int]], cfg: DataConfig, i: int) -> None:
    """Apply data.truncation, then keep the example if a token of it (after the first) is learned."""
    ids, labels = pair
    if len(ids) > cfg.seq_len:
        if cfg.truncation == "error":
            raise ConfigError(
                f"data.path = '{cfg.path}': record {i} has {len(ids)} tokens, more than "
                f"data.seq_len = {cfg.seq_len} (data.truncation: error)"
            )
        if cfg.truncation == "drop":
            counts["too_long"] += 1
            return
        ids, labels = ids[-cfg.seq_len :], labels[-cfg.seq_len :]  # keep the end: the last answer
        counts["truncated"] += 1
    if labels[1:].count(IGNORE) == len(labels[1:]):  # the first token is never a target (C-speed all())
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
    return [(stream[k * L : (k + 1) * L], stream[k * L : (k + 1) * L]) for k in range(n)]


def _nothing_to_learn(cfg: DataConfig, counts: Counter) -> str:
    if counts["bad_record"] == counts["records"]:
        fields = required_fields(cfg) or (
            [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field]
            if cfg.format == "preference"
            else [cfg.messages_field or chat.DEFAULT_FIELD.get(cfg.format, "?")]
        )
        return f"data.path = '{cfg.path}': no usable records (fields: {', '.join(fields)})"
    return (
        f"data.path = '{cfg.path}': no example has a labelled token within data.seq_len = {cfg.seq_len} "
        f"({describe(counts)}; data.truncation = {cfg.truncation})"
    )


def describe(counts: Counter) -> str:
    """'270 records: 12 examples; dropped 250 over seq_len, 8 with no labelled token; ...'"""
    parts = [f"{counts['records']} records -> {counts['examples']} examples"]
    dropped = [
        f"{counts[k]} {what}"
        for k, what in (
            ("too_long", "over seq_len"),
            ("no_labels", "with no labelled token"),
            ("bad_record", "bad record(s)"),
            ("no_room", "whose completions leave no room for the prompt"),
        )
        if counts[k]
    ]
    if dropped:
        parts.append("dropped " + ", ".join(dropped))
    if counts["truncated"]:
        parts.append(f"truncated {counts['truncated']} (kept their last seq_len tokens)")
    if counts["prompt_cut"]:
        parts.append(f"cut {counts['prompt_cut']} prompt(s) to data.max_prompt_tokens (kept their end)")
    return "; ".join(parts)
