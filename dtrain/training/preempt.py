"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or preemption) sets a flag;
the trainer then checkpoints at the next safe point on every rank (a step boundary, the next batch
of an evaluation or generation eval, the end of the save in progress) and exits with EXIT_CODE so
the job script can requeue. Installed first thing in `dtrain train`, before the heavy imports, so a
signal during start-up is not lost (the first safe point acts on it). The process's start time is
taken here too: `training.time_limit` counts from it (dtrain/training/deadline.py).
"""

from __future__ import annotations

import signal
import time

EXIT_CODE = 75  # EX_TEMPFAIL: "checkpoint written, requeue me"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested: str | None = None  # the signal's name, once one arrived
_started: float | None = None


class Preempted(Exception):
    """Raised at a safe point inside an evaluation or a generation eval: stop it, checkpoint, exit."""


def _handler(signum, _frame) -> None:
    global _requested
    _requested = signal.Signals(signum).name


def install() -> None:
    global _started
    if _started is None:
        _started = time.time()
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def started() -> float:
    """Wall-clock time (epoch seconds) the process installed the handlers (now, if it has not)."""
    return _started if _started is not None else time.time()


def requested() -> bool:
    """True once this process received SIGTERM or SIGUSR1."""
    return _requested is not None


def signal_name() -> str | None:
    """The name of the signal received (SIGUSR1, SIGTERM), None before one."""
    return _requested
