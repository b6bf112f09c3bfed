"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or preemption) sets a flag;
the trainer then checkpoints at the next step boundary on every rank and exits with EXIT_CODE so the
job script can requeue. Installed first thing in `dtrain train`, before the heavy imports, so a
signal during start-up is not lost (the first step boundary acts on it).
"""

from __future__ import annotations

import signal

EXIT_CODE = 75  # EX_TEMPFAIL: "checkpoint written, requeue me"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested = False


def _handler(signum, _frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> bool:
    """True once this process received SIGTERM or SIGUSR1."""
    return _requested
