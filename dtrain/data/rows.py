"""Ragged examples -> the rows the model sees: one example per row, or several (packed).

`Examples` holds the examples flat (`Ragged`, ragged.py) and, per row, which of them it lays end to
end. A micro-batch (`take`) is cut to its longest row, rounded up to a multiple of `pad_multiple`
and never past seq_len: no step computes padding beyond that (right padding: pad labels IGNORE,
attention 0, so the loss equals that of rows padded to seq_len).

Packed rows carry `position_ids` restarting at 0 at each example and no `attention_mask`:
transformers (5.x, sdpa and eager) then detects the packed format from the position ids and builds a
block-diagonal causal mask, so attention never crosses examples (see tests/unit/test_chat_packing.py,
which checks that a packed batch gives the loss and gradients of the same examples unpacked). The
first token of every packed example has no label: unpacked, it is never a target either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.data.ragged import Ragged, as_ragged

IGNORE = -100  # label of tokens that carry no loss
PAD_MULTIPLE = 8  # micro-batch widths round up to this (kernels like aligned shapes; few distinct shapes)


@dataclass
class Examples:
    """Rows over ragged examples: row r is examples rows[r]:rows[r+1] of `tokens`, end to end."""

    tokens: Ragged
    rows: torch.Tensor  # int64, n_rows + 1 boundaries into the examples
    seq_len: int
    pad_id: int
    packed: bool = False
    skipped: int = 0
    source: torch.Tensor | None = None  # dataset index of each row (unpacked rows)
    pad_multiple: int = PAD_MULTIPLE

    def __len__(self) -> int:
        return self.rows.numel() - 1

    def row_lengths(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Real tokens of each row (of rows `idx`)."""
        ends = self.tokens.offsets[self.rows]
        lengths = ends[1:] - ends[:-1]
        return lengths if idx is None else lengths[torch.as_tensor(idx, dtype=torch.long)]

    def width(self, idx: torch.Tensor) -> int:
        """Positions computed for rows `idx`: the longest, up to a multiple of pad_multiple, <= seq_len."""
        longest = int(self.row_lengths(idx).max()) if len(idx) else 1
        m = max(1, self.pad_multiple)
        return max(longest, min(self.seq_len, -(-longest // m) * m))

    def take(self, idx: torch.Tensor, width: int | None = None) -> dict[str, torch.Tensor]:
        """The model's batch for rows `idx`, `width` positions wide (default: `self.width(idx)`)."""
        ids, labels, mask, pos = self._dense(torch.as_tensor(idx, dtype=torch.long).reshape(-1), width)
        batch = {"input_ids": ids, "labels": labels}
        if self.packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        return batch

    def real_tokens(self, idx: torch.Tensor) -> int:
        """Non-pad tokens in rows `idx`."""
        return int(self.row_lengths(idx).sum())

    def _dense(self, idx: torch.Tensor, width: int | None):
        """(input_ids, labels, attention_mask, position_ids) of rows idx, right-padded to width."""
        width = self.width(idx) if width is None else width
        n, t = idx.numel(), self.tokens
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        for k, r in enumerate(idx.tolist()):
            first, last = int(self.rows[r]), int(self.rows[r + 1])
            bounds = t.offsets[first : last + 1]
            a, b = int(bounds[0]), int(bounds[-1])
            ids[k, : b - a] = t.ids[a:b]
            labels[k, : b - a] = t.labels[a:b]
            mask[k, : b - a] = 1
            starts, lengths = bounds[:-1] - a, bounds[1:] - bounds[:-1]
            pos[k, : b - a] = torch.arange(b - a) - torch.repeat_interleave(starts, lengths)
            if self.packed:
                labels[k, starts] = IGNORE  # an example's first token is no target of the one before
                pos[k, b - a :] = torch.arange(width - (b - a))  # the padding tail: one more (unlabelled) segment
        return ids, labels, mask, pos

    # dense views of every row at seq_len: for tests and reports (built on each access), never the training path
    @property
    def input_ids(self) -> torch.Tensor:
        return self._dense(torch.arange(len(self)), self.seq_len)[0]

    @property
    def labels(self) -> torch.Tensor:
        return self._dense(torch.arange(len(self)), self.seq_len)[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._dense(torch.arange(len(self)), self.seq_len)[2]

    @property
    def position_ids(self) -> torch.Tensor | None:
        return self._dense(torch.arange(len(self)), self.seq_len)[3] if self.packed else None

    def subset(self, idx: torch.Tensor) -> Examples:
        """Rows `idx` (with their examples) as a new Examples."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        counts = self.rows[1:][idx] - self.rows[:-1][idx]
        members = (
            torch.cat([torch.arange(int(self.rows[r]), int(self.rows[r + 1])) for r in idx.tolist()])
            if idx.numel()
            else torch.zeros(0, dtype=torch.long)
        )
        rows = torch.zeros(idx.numel() + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=rows[1:])
        return Examples(
            self.tokens.select(members),
            rows,
            self.seq_len,
            self.pad_id,
            self.packed,
            source=None if self.source is None else self.source[idx],
            pad_multiple=self.pad_multiple,
        )

    def split(self, eval_fraction: float, seed: int) -> tuple[Examples, Examples]:
        """(train, eval): a seeded shuffle, the last `eval_fraction` held out."""
        tr, ev = split_indices(len(self), eval_fraction, seed)
        return self.subset(tr), self.subset(ev)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) indices of n items: a seeded shuffle, the last `eval_fraction` held out, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = int(n * eval_fraction)
    return perm[: n - n_eval].sort().values, perm[n - n_eval :].sort().values


def pad_rows(seqs, seq_len: int, pad_id: int, source: list[int] | None = None) -> Examples:
    """One example per row (`seqs`: a Ragged or [(ids, labels)]); padded per micro-batch by `take`."""
    tokens = as_ragged(seqs)
    src = torch.tensor(source, dtype=torch.long) if source is not None else None
    return Examples(tokens, torch.arange(len(tokens) + 1), seq_len, pad_id, source=src)


def pack_rows(seqs, seq_len: int, pad_id: int) -> Examples:
    """Several examples per row of at most seq_len tokens, best-fit (packing.py)."""
    from dtrain.data.packing import best_fit

    tokens = as_ragged(seqs)
    groups = best_fit(tokens.lengths.tolist(), seq_len)
    order = torch.tensor([i for g in groups for i in g], dtype=torch.long)
    rows = torch.zeros(len(groups) + 1, dtype=torch.long)
    torch.cumsum(torch.tensor([len(g) for g in groups], dtype=torch.long), 0, out=rows[1:])
    return Examples(tokens.select(order), rows, seq_len, pad_id, packed=True)


@dataclass
class PairRows(Examples):
    """Preference pairs: rows 2k (chosen) and 2k + 1 (rejected) are pair k, one example each.
    Indexed by pair: `take(idx)` gives the rows of pairs `idx`, chosen and rejected interleaved."""

    def __len__(self) -> int:
        return (self.rows.numel() - 1) // 2

    @staticmethod
    def rows_of(idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return torch.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)

    def take(self, idx: torch.Tensor, width: int | None = None) -> dict[str, torch.Tensor]:
        return super().take(self.rows_of(idx), width)

    def real_tokens(self, idx: torch.Tensor) -> int:
        return super().real_tokens(self.rows_of(idx))


def pair_rows(sides, seq_len: int, pad_id: int) -> PairRows:
    """Consecutive examples (chosen, rejected) of `sides` (a Ragged or [(ids, labels)]) as pairs of rows."""
    flat = pad_rows(sides, seq_len, pad_id)
    return PairRows(flat.tokens, flat.rows, seq_len, pad_id)
