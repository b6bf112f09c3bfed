"""The data of a run: tokenize once (rank 0, through the token cache), split, mix, pad or pack."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dtrain.config import DataConfig
from dtrain.data import cache, preference, sources as sources_lib
from dtrain.data.encode import Encoded, describe, encode
from dtrain.data.records import load_records
from dtrain.data.rows import Examples, pack_rows, pad_rows, pair_rows, split_indices

log = logging.getLogger("dtrain.data")


@dataclass
class Prepared:
    train: Examples
    eval: Examples
    skipped: int  # bad records, all datasets
    cache_hit: bool


def tokenize(cfg: DataConfig, records: list[dict], tokenizer) -> Examples:
    """One dataset's records -> rows (padded, or packed with data.packing); no split."""
    enc = encode(cfg, records, tokenizer)
    ex = to_rows(preference.group(enc.seqs) if cfg.format == "preference" else enc.seqs, cfg, tokenizer)
    ex.skipped = enc.counts["bad_record"]
    return ex


def to_rows(seqs, cfg: DataConfig, tokenizer, source: list[int] | None = None) -> Examples:
    if cfg.format == "preference":  # seqs are (chosen, rejected) pairs
        return pair_rows(seqs, cfg.seq_len, tokenizer.pad_token_id)
    if cfg.packing:
        return pack_rows(seqs, cfg.seq_len, tokenizer.pad_token_id)
    return pad_rows(seqs, cfg.seq_len, tokenizer.pad_token_id, source)


def encode_all(cfgs: list[DataConfig], tokenizer, progress: bool) -> list[Encoded]:
    return [encode(c, load_records(c), tokenizer, progress=progress) for c in cfgs]


def prepare(cfg: DataConfig, tokenizer, seed: int, is_main: bool = True,
            barrier: Callable[[], None] = lambda: None) -> Prepared:
    """Train and eval rows of the run. Rank 0 reads the token cache or tokenizes and writes it;
    `barrier` (every rank calls it) then lets the other ranks read the entry rank 0 wrote."""
    srcs = sources_lib.sources(cfg)
    ev_cfg = sources_lib.eval_source(cfg)
    cfgs = [c for c, _ in srcs] + ([ev_cfg] if ev_cfg else [])
    root, k = cache.cache_dir(cfg), cache.key(cfgs, tokenizer)
    encoded = cache.load(root, k) if is_main else None
    hit = encoded is not None
    if is_main and hit:
        log.info("data: token cache hit (%s)", root / k)
    elif is_main:
        encoded = encode_all(cfgs, tokenizer, progress=True)
        cache.save(root, k, cfgs, encoded)
    barrier()
    if not is_main:
        encoded = cache.load(root, k)
        hit = encoded is not None
        encoded = encoded or encode_all(cfgs, tokenizer, progress=False)  # cache dir not shared with rank 0
    for c, e in zip(cfgs, encoded):
        log.info("data: %s (%s): %s", c.path, c.format, describe(e.counts))
    if cfg.format == "preference":  # the cache holds a pair as 2 consecutive examples; split and mix pairs
        encoded = [Encoded(preference.group(e.seqs), e.counts) for e in encoded]
    train, evals = _split_and_mix(cfg, srcs, encoded, seed)
    train_rows = to_rows([s for _, s in train], cfg, tokenizer, [i for i, _ in train])
    eval_rows = to_rows(evals, cfg, tokenizer)
    if cfg.packing:
        log.info("data: packed %d train examples into %d rows of %d tokens", len(train), len(train_rows), cfg.seq_len)
    return Prepared(train_rows, eval_rows, sum(e.counts["bad_record"] for e in encoded), hit)


def _split_and_mix(cfg: DataConfig, srcs, encoded: list[Encoded], seed: int):
    """[(dataset, example)] for training and [example] for evaluation."""
    train_parts, evals = [], []
    for i, (c, _) in enumerate(srcs):
        seqs = encoded[i].seqs
        if cfg.eval_path is None:
            tr, ev = split_indices(len(seqs), cfg.eval_fraction, seed)
            train_parts.append([seqs[j] for j in tr.tolist()])
            evals += [seqs[j] for j in ev.tolist()]
        else:
            train_parts.append(seqs)
    if cfg.eval_path is not None:
        evals = encoded[-1].seqs
    pairs = sources_lib.mix([len(p) for p in train_parts], [w for _, w in srcs], seed)
    return [(i, train_parts[i][j]) for i, j in pairs], evals
