"""The launcher's environment: rank, world size and device, from torchrun, deepspeed or SLURM."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dist_backend: str  # "gloo" or "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(device: str = "auto", dist_backend: str = "auto") -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun, deepspeed) or SLURM_PROCID/NTASKS/LOCALID (srun)."""
    env = os.environ
    if "RANK" in env:
        rank, world = int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        rank, world, local = 0, 1, 0
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist_backend == "auto":
        dist_backend = "nccl" if dev.type == "cuda" else "gloo"
    return DistEnv(rank, world, local, dev, dist_backend)


def exit_now(code: int) -> None:
    """End a rank of a multi-process run without the interpreter's teardown.

    After the process group is destroyed, threads of the communication libraries can still be
    joinable when C++ static destructors run, which aborts the process ("terminate called without an
    active exception", exit 250/134) and turns a clean run into a failed job. Flush and leave.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
