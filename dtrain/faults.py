"""Planted faults for dtrain's own tests and for checking `dtrain verify`: never read from a
config, only from the environment variable DTRAIN_TEST_FAULT, so no user setting can switch one
on by accident; a run with one active says so in a warning on every rank.

    DTRAIN_TEST_FAULT=nan_loss:2,4,5        the loss of steps 2, 4, 5 (1-based) is NaN on the
                                            last rank only (the others must notice too)
    DTRAIN_TEST_FAULT=drop_grad:layers.1.   a sharded backend (FSDP2, ZeRO-3) zeroes the gradient
                                            of every LoRA parameter whose name contains the text
    DTRAIN_TEST_FAULT=slow_step:0.8         every optimizer step sleeps 0.8 s more (numbers
                                            unchanged): a test job outlasts a short SLURM time
                                            limit on a fast machine too, without using its CPUs
"""

from __future__ import annotations

import logging
import os

ENV = "DTRAIN_TEST_FAULT"
log = logging.getLogger(__name__)
_warned = False


def _active(kind: str) -> str | None:
    global _warned
    value = os.environ.get(ENV, "")
    name, _, arg = value.partition(":")
    if name != kind:
        return None
    if not _warned:
        _warned = True
        log.warning("%s=%s: a planted fault for testing is active", ENV, value)
    return arg


def nan_loss(step: int, rank: int, world: int) -> bool:
    """True when the loss of (1-based) `step` must be made NaN on this rank."""
    arg = _active("nan_loss")
    return arg is not None and rank == world - 1 and str(step) in arg.split(",")


def dropped_grad(name: str) -> bool:
    """True when the gradient of parameter `name` must be dropped (a sharded backend's fault)."""
    arg = _active("drop_grad")
    return bool(arg) and arg in name


def step_delay() -> float:
    """Seconds each optimizer step must sleep (slow_step), 0.0 without that fault."""
    arg = _active("slow_step")
    return float(arg) if arg else 0.0
