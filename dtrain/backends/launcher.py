"""The launcher's view of this process, from environment variables alone: torchrun and deepspeed
set RANK / WORLD_SIZE, srun SLURM_PROCID / SLURM_NTASKS. Readable before torch is imported, so the
CLI can print an error once (not once per rank) and only rank 0 downloads, long before a process
group exists. The process group itself is set up from the same variables by `env.detect`."""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank under a launcher (torchrun, deepspeed, srun), 0 when alone."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def is_multi_process() -> bool:
    """One rank of several (or a SLURM task): such a process leaves without the interpreter's teardown."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "SLURM_PROCID" in os.environ
