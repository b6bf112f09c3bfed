"""Tokenization at scale: a dataset's records in chunks over data.num_proc processes, each chunk
written to a shard file as it finishes (shards.py), so the tokenizing process holds one chunk per
worker, never the data set. The records are read from `datasets`' memory-mapped Arrow table.

Workers are forked (they inherit the table and the tokenizer without pickling them) and use no
torch: a fork of a process whose OpenMP pool has run may hang in the child's first parallel region.
Format `text` joins all documents into one stream before cutting rows, `preference` keeps each
chosen / rejected pair together: both are tokenized in process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from dtrain.config.schema import DataConfig
from dtrain.data import records as records_lib, segments
from dtrain.data.encode import PROGRESS_MIN, encode, encode_part, report, template_for
from dtrain.data.shards import Shard, write_shard

CHUNK = 8192  # records per shard
_JOB: dict = {}  # what forked workers inherit: cfg, dataset, tokenizer, out dir


def default_num_proc() -> int:
    """The cores this process may use (its CPU affinity, which SLURM and taskset restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def encode_to_shards(cfg: DataConfig, tokenizer, out: Path, progress: bool) -> tuple[list[Shard], Counter]:
    """Tokenize data.path into shards under `out`; (shards in record order, counts of the dataset)."""
    ds = records_lib.open_dataset(cfg)
    template_for(cfg, tokenizer)  # a missing chat template: one error, before any worker starts
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        segments.for_tokenizer(tokenizer.backend_tokenizer)  # its vocabulary checks once, inherited by the workers
    if cfg.format in ("text", "preference"):  # one stream of documents; pairs kept together
        return _serial_shards(cfg, ds, tokenizer, out)
    n, procs = len(ds), cfg.num_proc or default_num_proc()
    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    procs = max(1, min(procs, len(chunks)))
    _JOB.update(cfg=cfg, ds=ds, tokenizer=tokenizer, out=out)
    bar = tqdm(
        total=n,
        desc=f"tokenize {Path(cfg.path).name} ({procs} proc)",
        leave=False,
        dynamic_ncols=True,
        disable=not progress or n < PROGRESS_MIN,
    )
    shards, counts, first_bad = [], Counter(records=n), None
    pool = _pool(procs) if procs > 1 else None
    try:
        results = map(_chunk, chunks) if pool is None else pool.imap(_chunk, chunks)
        for (a, b), (shard, part_counts, bad) in zip(chunks, results):
            shards.append(shard)
            counts.update(part_counts)
            first_bad = bad if first_bad is None else first_bad
            bar.update(b - a)
    finally:
        if pool is not None:  # every result is in (or an error is on its way): reap the workers
            pool.terminate()
            pool.join()
        _JOB.clear()
        bar.close()
    counts["records"] = n
    report(cfg, counts, first_bad, sum(s.n_examples for s in shards))
    return shards, counts


def _pool(procs: int):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: procs is the parallelism
    return multiprocessing.get_context("fork").Pool(procs, initializer=_default_signals)


def _default_signals() -> None:
    # A fork inherits the trainer's preemption handler, which turns SIGTERM into a flag: the pool's
    # terminate() would then never end an idle worker and join() would wait forever.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _chunk(span: tuple[int, int]) -> tuple[Shard, Counter, int | None]:
    a, b = span
    cfg, ds, tokenizer = _JOB["cfg"], _JOB["ds"], _JOB["tokenizer"]
    columns = ds[a:b]
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    part = encode_part(cfg, rows, tokenizer, a)
    part.counts.pop("records", None)
    shard = write_shard(_JOB["out"] / f"{a:012d}", *part.kept.arrays())
    return shard, part.counts, part.first_bad


def _serial_shards(cfg: DataConfig, ds, tokenizer, out: Path) -> tuple[list[Shard], Counter]:
    enc = encode(cfg, ds.to_list(), tokenizer, progress=True)
    r = enc.examples
    return [write_shard(out / "text", r.ids.numpy(), r.labels.numpy(), r.lengths.numpy())], enc.counts
