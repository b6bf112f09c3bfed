"""When a run stops early, decided the same on every rank: a preemption signal on any rank or the
job's deadline (dtrain/training/deadline.py, rank 0's clock) at a safe point; too many non-finite steps."""

from __future__ import annotations

import logging

import torch

from dtrain.config.schema import Config
from dtrain.errors import DtrainError
from dtrain.training import deadline as deadline_lib, preempt

log = logging.getLogger("dtrain")


class TrainingStopped(DtrainError):
    """The run cannot go on (non-finite steps): one line, exit 1 (not a config error)."""

    exit_code = 1


class Stops:
    """`check()` at a safe point: True when every rank must checkpoint and exit 75 (`reason` says why).
    The deadline acts only once this process has made a step: a checkpoint at its start would save
    nothing, and a time limit shorter than the start-up would requeue the job forever."""

    def __init__(self, backend, cfg: Config) -> None:
        t = cfg.training
        limit = deadline_lib.parse_duration(t.time_limit) if t.time_limit else None
        self.backend, self.armed, self.reason = backend, False, ""
        end = deadline_lib.slurm_end_time() if backend.rank == 0 else None
        self.deadline = deadline_lib.Deadline(preempt.started(), limit, end)

    def local(self) -> bool:
        """This rank's own view, without communication (rank 0's generation eval asks it)."""
        return preempt.requested() or (self.armed and self.deadline.due())

    def check(self, local: bool | None = None) -> bool:
        """Collective: True on every rank when any rank was signalled or rank 0's deadline is due;
        `local` replaces this rank's signal flag (a decision rank 0 made alone)."""
        late = self.armed and self.backend.rank == 0 and self.deadline.due()
        sig = preempt.requested() if local is None else local
        flags = self.backend.all_reduce_sum(torch.tensor([float(sig), float(late)]))
        if flags[1] > 0:
            d, left = self.deadline, self.deadline.left()
            when = f"ends in {left:.0f} s" if left >= 0 else f"ended {-left:.0f} s ago"
            self.reason = f"{d.source} {when}, under the margin of {d.margin:.0f} s"
        elif flags[0] > 0:
            self.reason = preempt.signal_name() or "a preemption signal on another rank"
        return bool(flags.sum() > 0)


class NonFinite:
    """Counts steps whose loss or gradient norm was not finite (training.nonfinite, nonfinite_max)."""

    def __init__(self, cfg: Config) -> None:
        self.mode, self.max = cfg.training.nonfinite, cfg.training.nonfinite_max
        self.total = self.in_row = 0

    def seen(self, row: dict, what: str) -> str | None:
        """Mark the metrics row; returns the reason to stop, or None to go on."""
        if not what:
            self.in_row = 0
            return None
        self.total, self.in_row = self.total + 1, self.in_row + 1
        row.update(nonfinite=what, skipped=True, nonfinite_steps=self.total)
        line = (
            f"step {row['step']}: non-finite {what} (loss {row['loss']}, grad norm {row['grad_norm']}) "
            f"on every rank: step skipped, no update ({self.in_row} in a row, {self.total} in all)"
        )
        log.warning("%s", line)
        if self.mode == "stop":
            return f"{line}; stopping (training.nonfinite=stop)"
        if self.in_row >= self.max:
            return f"{line}; stopping after {self.in_row} in a row (training.nonfinite_max={self.max})"
        return None
