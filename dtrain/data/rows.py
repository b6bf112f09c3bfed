"""Examples of any length -> fixed rows of seq_len: one example per row (padded), or packed.

Packed rows carry `position_ids` restarting at 0 at each example and no `attention_mask`:
transformers (5.x, sdpa and eager) then detects the packed format from the position ids and builds a
block-diagonal causal mask, so attention never crosses examples (see tests/unit/test_chat_packing.py,
which checks that a packed batch gives the loss and gradients of the same examples unpacked). The
first token of every packed example has no label: unpacked, it is never a target either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Examples:
    """Rows of seq_len tokens: input_ids, labels, attention_mask (1 on real tokens, 0 on padding);
    position_ids only when packed (then the batch carries them instead of the attention mask)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    skipped: int = 0
    source: torch.Tensor | None = None  # dataset index of each row (unpacked rows)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's batch for rows `idx`."""
        batch = {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
        if self.position_ids is None:
            batch["attention_mask"] = self.attention_mask[idx]
        else:
            batch["position_ids"] = self.position_ids[idx]
        return batch

    def real_tokens(self, idx: torch.Tensor) -> int:
        """Non-pad tokens in rows `idx`."""
        return int(self.attention_mask[idx].sum())

    def subset(self, idx: torch.Tensor) -> Examples:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Examples(self.input_ids[idx], self.labels[idx], self.attention_mask[idx], pick(self.position_ids),
                        source=pick(self.source))

    def split(self, eval_fraction: float, seed: int) -> tuple[Examples, Examples]:
        """(train, eval): a seeded shuffle, the last `eval_fraction` held out."""
        tr, ev = split_indices(len(self), eval_fraction, seed)
        return self.subset(tr), self.subset(ev)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) indices of n items: a seeded shuffle, the last `eval_fraction` held out, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = int(n * eval_fraction)
    return perm[: n - n_eval].sort().values, perm[n - n_eval:].sort().values


def pad_rows(seqs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
             source: list[int] | None = None) -> Examples:
    """One example per row, right-padded to seq_len (pad labels IGNORE, attention 0)."""
    n = len(seqs)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        labels[i, : len(s)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(s)] = 1
    src = torch.tensor(source, dtype=torch.long) if source is not None else None
    return Examples(ids, labels, mask, source=src)


def pack_rows(seqs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Examples:
    """Examples in order, each appended to the current row while it fits, else starting a new row."""
    rows: list[list[int]] = []
    fill = seq_len + 1
    for i, (s, _) in enumerate(seqs):
        if fill + len(s) <= seq_len:
            rows[-1].append(i)
            fill += len(s)
        else:
            rows.append([i])
            fill = len(s)
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    pos = torch.zeros((n, seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            s, lab = seqs[j]
            ids[r, at: at + len(s)] = torch.tensor(s, dtype=torch.long)
            labels[r, at + 1: at + len(s)] = torch.tensor(lab[1:], dtype=torch.long)
            mask[r, at: at + len(s)] = 1
            pos[r, at: at + len(s)] = torch.arange(len(s))
            at += len(s)
        pos[r, at:] = torch.arange(seq_len - at)  # the padding tail: one more (unlabelled) segment
    return Examples(ids, labels, mask, position_ids=pos)


@dataclass
class PairRows(Examples):
    """Preference pairs: rows 2k (chosen) and 2k + 1 (rejected) are pair k, each padded to seq_len.
    Indexed by pair: `take(idx)` gives the rows of pairs `idx`, chosen and rejected interleaved."""

    def __len__(self) -> int:
        return self.input_ids.shape[0] // 2

    @staticmethod
    def rows_of(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().take(self.rows_of(idx))

    def real_tokens(self, idx: torch.Tensor) -> int:
        return super().real_tokens(self.rows_of(idx))


def pair_rows(pairs: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]], seq_len: int,
              pad_id: int) -> PairRows:
    """Each pair as two padded rows (chosen, rejected)."""
    flat = pad_rows([side for p in pairs for side in p], seq_len, pad_id)
    return PairRows(flat.input_ids, flat.labels, flat.attention_mask)
