"""Datasets from local files -> tokenized examples -> the batches each rank sees at each step.

Two formats: `text` (tokenize, join with EOS, pack into sequences of `seq_len`) and `instruction`
(prompt + response, loss masked on the prompt and the padding). The batch plan is a pure function
of (seed, step, rank), so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dtrain.config import DataConfig
from dtrain.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Examples:
    """Tokenized examples, all `seq_len` long: input_ids, labels, attention_mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx],
                "attention_mask": self.attention_mask[idx]}

    def split(self, eval_fraction: float, seed: int) -> tuple[Examples, Examples]:
        """(train, eval): a seeded shuffle, the last `eval_fraction` held out."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_eval = int(len(self) * eval_fraction)
        tr, ev = perm[: len(self) - n_eval].sort().values, perm[len(self) - n_eval:].sort().values
        return Examples(**self.take(tr)), Examples(**self.take(ev))


def load_records(cfg: DataConfig) -> list[dict]:
    """The raw records of data.path, read with `datasets` (no hub access)."""
    import datasets

    path = Path(cfg.path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"data.path = '{path}': unsupported file type (allowed: {', '.join(BUILDERS)})")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder == "csv":  # keep the fields as written: an answer "4" must not become the int 4
        kwargs["converters"] = {f: str for f in (cfg.text_field, cfg.prompt_field, cfg.response_field)}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types for a malformed file
        raise ConfigError(f"data.path = '{path}': cannot read as {builder}: {str(e).splitlines()[0]}") from None
    return ds.to_list()


def tokenize(cfg: DataConfig, records: list[dict], tokenizer) -> Examples:
    """Tokenize records in the configured format; count (or reject) missing/empty fields."""
    fields = [cfg.text_field] if cfg.format == "text" else [cfg.prompt_field, cfg.response_field]
    good, bad = [], []
    for i, rec in enumerate(records):
        if Path(cfg.path).suffix.lower() == ".txt":
            rec = {cfg.text_field: rec.get("text")}
        missing = [f for f in fields if not isinstance(rec.get(f), str) or not rec[f].strip()]
        if missing:
            if cfg.bad_records == "error":
                raise ConfigError(f"data.path = '{cfg.path}': record {i} has a missing or empty '{missing[0]}'")
            bad.append(i)
            continue
        good.append(rec)
    if bad:
        log.warning("data: skipped %d record(s) with a missing or empty field (first: record %d)", len(bad), bad[0])
    if not good:
        raise ConfigError(f"data.path = '{cfg.path}': no usable records (fields: {', '.join(fields)})")
    ex = pack_text(good, cfg, tokenizer) if cfg.format == "text" else pad_pairs(good, cfg, tokenizer)
    ex.skipped = len(bad)
    return ex


def pack_text(records: list[dict], cfg: DataConfig, tokenizer) -> Examples:
    """Join documents with EOS and cut the stream into full sequences of seq_len."""
    stream: list[int] = []
    for rec in records:
        stream += tokenizer(rec[cfg.text_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // cfg.seq_len
    if n == 0:
        raise ConfigError(f"data.path = '{cfg.path}': {len(stream)} tokens, fewer than data.seq_len = {cfg.seq_len}")
    ids = torch.tensor(stream[: n * cfg.seq_len]).view(n, cfg.seq_len)
    return Examples(ids, ids.clone(), torch.ones_like(ids))


def pad_pairs(records: list[dict], cfg: DataConfig, tokenizer) -> Examples:
    """prompt + response + EOS, truncated and padded to seq_len; labels IGNORE on prompt and padding."""
    L, pad = cfg.seq_len, tokenizer.pad_token_id
    ids = torch.full((len(records), L), pad, dtype=torch.long)
    labels = torch.full((len(records), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(records), L), dtype=torch.long)
    for i, rec in enumerate(records):
        p = tokenizer(rec[cfg.prompt_field], add_special_tokens=False)["input_ids"]
        r = tokenizer(rec[cfg.response_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (p + r)[:L]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(seq[len(p):], dtype=torch.long)
    return Examples(ids, labels, mask)


@dataclass(frozen=True)
class BatchPlan:
    """Which examples rank `rank` uses in micro-batch `micro` of optimizer step `step`.

    Each epoch is a seeded permutation cut into global batches of micro_batch * grad_accum * world
    examples (the last partial one dropped), so every example is seen once per epoch in total.
    """

    n_examples: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{epoch}".encode()))
        perm = torch.randperm(self.n_examples, generator=g)
        start = within * self.global_batch + (micro * self.world + rank) * self.micro_batch
        return perm[start: start + self.micro_batch]

    def position(self, step: int) -> dict:
        """Where step `step` lies in the data: epoch and step within the epoch."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": within}


def total_steps(max_steps: int, epochs: int, plan: BatchPlan) -> int:
    return max_steps if max_steps > 0 else epochs * plan.steps_per_epoch


def check_plan(plan: BatchPlan, source: str) -> None:
    if plan.steps_per_epoch == 0:
        need = math.ceil(plan.global_batch)
        raise ConfigError(
            f"{source}: {plan.n_examples} training examples, fewer than one global batch of {need} "
            "(training.micro_batch_size x training.grad_accum x ranks)"
        )
