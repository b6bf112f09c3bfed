"""The data of a run: tokenize once (rank 0, through the token cache), split, mix, pad or pack."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dtrain.config.schema import DataConfig
from dtrain.data import cache, sources as sources_lib
from dtrain.data.encode import Encoded, describe, encode
from dtrain.data.ragged import Ragged
from dtrain.data.rows import Examples, PairRows, pack_rows, pad_rows, pair_rows, split_indices

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
    ex = to_rows(enc.examples, cfg, tokenizer)
    ex.skipped = enc.counts["bad_record"]
    return ex


def to_rows(seqs, cfg: DataConfig, tokenizer, source: list[int] | None = None) -> Examples:
    """Rows of `seqs` (a Ragged, or [(ids, labels)]): packed with data.packing, else one per row."""
    if cfg.format == "preference":  # consecutive examples 2k, 2k+1 are pair k
        return pair_rows(seqs, cfg.seq_len, tokenizer.pad_token_id)
    if cfg.packing:
        return pack_rows(seqs, cfg.seq_len, tokenizer.pad_token_id)
    return pad_rows(seqs, cfg.seq_len, tokenizer.pad_token_id, source)


def encode_all(cfgs: list[DataConfig], tokenizer, progress: bool, root: Path, k: str) -> list[Encoded]:
    """Tokenize the datasets (data.num_proc processes, in shards) into cache entry `k` under `root`;
    their examples, read back memory-mapped."""
    return cache.build(root, k, cfgs, tokenizer, progress)


def prepare(
    cfg: DataConfig, tokenizer, seed: int, is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> Prepared:
    """Train and eval rows of the run. Rank 0 reads the token cache or tokenizes and writes it;
    `barrier` (every rank calls it) then lets the other ranks read the entry rank 0 wrote."""
    srcs = sources_lib.sources(cfg)
    ev_cfg = sources_lib.eval_source(cfg)
    cfgs = [c for c, _ in srcs] + ([ev_cfg] if ev_cfg else [])
    root = cache.cache_dir(cfg)
    encoded = hit = None
    if is_main:
        k = cache.key(cfgs, tokenizer)
        encoded = cache.load(root, k)
        hit = encoded is not None
        if hit:
            log.info("data: token cache hit (%s)", root / k)
        else:
            encoded = encode_all(cfgs, tokenizer, True, root, k)
    barrier()
    if not is_main:  # the key after the barrier: a Hub dataset is in the cache once rank 0 fetched it
        k = cache.key(cfgs, tokenizer)
        encoded = cache.load(root, k)
        hit = encoded is not None
        encoded = encoded or encode_all(cfgs, tokenizer, False, root, k)  # cache not shared with rank 0
    for c, e in zip(cfgs, encoded):
        log.info("data: %s (%s): %s", c.path, c.format, describe(e.counts))
    train, source, evals = _split_and_mix(cfg, srcs, encoded, seed)
    train_rows = to_rows(train, cfg, tokenizer, source)
    eval_rows = to_rows(evals, cfg, tokenizer)
    if cfg.packing:
        log.info("data: packed %d train examples into %d rows of %d tokens", len(train), len(train_rows), cfg.seq_len)
    return Prepared(train_rows, eval_rows, sum(e.counts["bad_record"] for e in encoded), hit)


def _split_and_mix(cfg: DataConfig, srcs, encoded: list[Encoded], seed: int) -> tuple[Ragged, list[int], Ragged]:
    """(training examples in mixed order, the dataset of each, evaluation examples)."""
    k = 2 if cfg.format == "preference" else 1  # a preference pair is 2 consecutive examples: split and mix pairs
    items = PairRows.rows_of if k == 2 else (lambda idx: idx)
    train_parts, evals = [], []
    for i in range(len(srcs)):
        ex = encoded[i].examples
        if cfg.eval_path is None:
            tr, ev = split_indices(len(ex) // k, cfg.eval_fraction, seed)
            train_parts.append(ex.select(items(tr)))
            evals.append(ex.select(items(ev)))
        else:
            train_parts.append(ex)
    eval_examples = encoded[-1].examples if cfg.eval_path is not None else Ragged.concat(evals)
    pairs = sources_lib.mix([len(p) // k for p in train_parts], [w for _, w in srcs], seed)
    base = [0]
    for p in train_parts:
        base.append(base[-1] + len(p) // k)
    order = items(torch.tensor([base[i] + j for i, j in pairs], dtype=torch.long))
    train = train_parts[0] if len(train_parts) == 1 else Ragged.concat(train_parts)
    # in order (one dataset, nothing held out): no copy, the examples stay memory-mapped from the cache
    if not torch.equal(order, torch.arange(len(train))):
        train = train.select(order)
    return train, [i for i, _ in pairs], eval_examples
