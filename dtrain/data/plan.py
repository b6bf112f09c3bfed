"""The batch plan: which examples rank r uses in micro-batch m of step s (a pure function of them)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from dtrain.errors import ConfigError


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
