"""When this job must stop: `training.time_limit` (from the process's start) and, under SLURM, the
job's end time. A checkpoint is due when the time left falls below a margin measured from this
run's own durations: twice the last save, plus the longest step and the longest evaluation seen,
and at least MIN_MARGIN_S. Pure Python, no torch: the trainer asks `due()` at its safe points.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime

from dtrain.config.types import parse_duration  # noqa: F401  (deadline.parse_duration for its users)

MIN_MARGIN_S = 5.0


def slurm_end_time(env: dict | None = None) -> float | None:
    """The SLURM job's end time (epoch seconds): SLURM_JOB_END_TIME, else `squeue`; None outside SLURM."""
    env = os.environ if env is None else env
    value = env.get("SLURM_JOB_END_TIME", "")
    if value.isdigit() and int(value) > 0:
        return float(value)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return datetime.fromisoformat(out).timestamp()  # local time, as squeue prints it
    except (OSError, ValueError, subprocess.SubprocessError):
        return None  # no squeue, or no end time (UNLIMITED): no deadline from SLURM


class Deadline:
    """The earlier of start + time_limit and SLURM's end time; `due()` when a checkpoint must start."""

    def __init__(self, start: float, limit_s: float | None, slurm_end: float | None) -> None:
        ends = [t for t in (start + limit_s if limit_s else None, slurm_end) if t]
        self.end = min(ends) if ends else None
        self.source = "training.time_limit" if ends and self.end == ends[0] and limit_s else "SLURM job end"
        self.save_s = self.step_s = self.eval_s = 0.0

    def saw(self, kind: str, seconds: float) -> None:
        """Record a duration: 'save' (the last one counts), 'step' and 'eval' (the longest counts)."""
        if kind == "save":
            self.save_s = seconds
        elif kind == "step":
            self.step_s = max(self.step_s, seconds)
        else:
            self.eval_s = max(self.eval_s, seconds)

    @property
    def margin(self) -> float:
        return max(MIN_MARGIN_S, 2 * self.save_s + self.step_s + self.eval_s)

    def left(self, now: float | None = None) -> float | None:
        return None if self.end is None else self.end - (time.time() if now is None else now)

    def due(self, now: float | None = None) -> bool:
        left = self.left(now)
        return left is not None and left < self.margin
