"""Examples of any length, stored flat: the format of the in-memory data and of the token cache.

`Ragged(ids, labels, offsets)`: example i is `ids[offsets[i]:offsets[i+1]]` with its labels at the
same positions; ids and labels are int32, offsets int64 with offsets[0] = 0 and offsets[-1] =
len(ids). Memory grows with the tokens, not with examples x seq_len, and the three arrays are what
the cache writes (so a reader can memory-map them as they are).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Ragged:
    ids: torch.Tensor  # int32, every example's tokens end to end
    labels: torch.Tensor  # int32, the same length as ids
    offsets: torch.Tensor  # int64, n + 1 example boundaries

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def seq(self, i: int) -> tuple[list[int], list[int]]:
        """(ids, labels) of example i as lists."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].tolist(), self.labels[a:b].tolist()

    def seqs(self) -> list[tuple[list[int], list[int]]]:
        return [self.seq(i) for i in range(len(self))]

    def select(self, idx: torch.Tensor) -> Ragged:
        """The examples `idx`, in that order (repeats allowed), as a new Ragged."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        starts, lengths = self.offsets[:-1][idx], self.lengths[idx]
        offsets = torch.zeros(idx.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        # source position of every output token: its example's start + its place in the example
        within = torch.arange(int(offsets[-1]), dtype=torch.long) - torch.repeat_interleave(offsets[:-1], lengths)
        src = torch.repeat_interleave(starts, lengths) + within
        return Ragged(self.ids[src], self.labels[src], offsets)

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        if not parts:
            return Ragged.from_seqs([])
        shift = torch.tensor([0] + [int(p.offsets[-1]) for p in parts[:-1]], dtype=torch.long).cumsum(0)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long)] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        return Ragged(torch.cat([p.ids for p in parts]), torch.cat([p.labels for p in parts]), offsets)

    @staticmethod
    def from_seqs(seqs: Iterable[tuple[list[int], list[int]]]) -> Ragged:
        b = RaggedBuilder()
        for ids, labels in seqs:
            b.add(ids, labels)
        return b.build()


def as_ragged(seqs) -> Ragged:
    """A Ragged as it is, or one built from [(ids, labels)]."""
    return seqs if isinstance(seqs, Ragged) else Ragged.from_seqs(seqs)


class RaggedBuilder:
    """Appends examples into flat int32 buffers (4 bytes a token, not a Python int each)."""

    def __init__(self) -> None:
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def add(self, ids: list[int], labels: list[int]) -> None:
        self._ids.extend(ids)
        self._labels.extend(labels)
        self._offsets.append(len(self._ids))

    def arrays(self) -> tuple[array, array, array]:
        """(ids, labels, lengths) as flat arrays, without torch (tokenizing workers write them)."""
        off = self._offsets
        return self._ids, self._labels, array("q", (b - a for a, b in zip(off[:-1], off[1:])))

    def build(self) -> Ragged:
        def tensor(buf: array, dtype: torch.dtype) -> torch.Tensor:
            return torch.frombuffer(buf, dtype=dtype).clone() if len(buf) else torch.zeros(0, dtype=dtype)

        return Ragged(
            tensor(self._ids, torch.int32), tensor(self._labels, torch.int32), tensor(self._offsets, torch.int64)
        )
