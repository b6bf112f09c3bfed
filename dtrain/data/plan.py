"""The batch plan: which examples rank r uses in micro-batch m of step s (a pure function of them)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from dtrain.errors import ConfigError

GROUP = 64  # global batches sorted together under data.group_by_length (HF's megabatches are 50)


@dataclass(frozen=True)
class BatchPlan:
    """Which examples rank `rank` uses in micro-batch `micro` of optimizer step `step`.

    Each epoch is a seeded permutation cut into global batches of micro_batch * grad_accum * world
    examples (the last partial one dropped), so every example is seen once per epoch in total.

    With `lengths` (data.group_by_length) each run of GROUP global batches of that permutation is
    sorted by length, longest first, so a micro-batch holds examples of similar length (it is cut to
    its longest), and those global batches are then put in a seeded order: still a pure function of
    (seed, step, rank) and of the global batch, so resumes (on any world size) see the same batches.
    """

    n_examples: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int
    lengths: torch.Tensor | None = field(default=None, compare=False, repr=False)

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
        if self.lengths is not None:
            block = self._grouped_batch(perm, epoch, within)
        else:
            block = perm[within * self.global_batch : (within + 1) * self.global_batch]
        start = (micro * self.world + rank) * self.micro_batch
        return block[start : start + self.micro_batch]

    def _grouped_batch(self, perm: torch.Tensor, epoch: int, within: int) -> torch.Tensor:
        """Global batch `within` of the epoch under length grouping."""
        gb = self.global_batch
        first = within // GROUP * GROUP
        count = min(GROUP, self.steps_per_epoch - first)  # the epoch's last group may be shorter
        members = perm[first * gb : (first + count) * gb]
        ranked = members[torch.sort(self.lengths[members], descending=True, stable=True).indices]
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{epoch}:{first}:group".encode()))
        which = int(torch.randperm(count, generator=g)[within - first])
        return ranked[which * gb : (which + 1) * gb]

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
