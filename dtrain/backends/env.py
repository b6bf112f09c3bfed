"""The launcher's environment: rank, world size and device, from torchrun, deepspeed or SLURM."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from dtrain.errors import ConfigError


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
        local = _local_rank(rank)
        os.environ.setdefault("LOCAL_RANK", str(local))  # DeepSpeed's engine reads it
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _first_slurm_host()
    else:
        rank, world, local = 0, 1, 0
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend.device = cuda, but torch sees no CUDA device (allowed: auto, cpu)")
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist_backend == "auto":
        dist_backend = "nccl" if dev.type == "cuda" else "gloo"
    return DistEnv(rank, world, local, dev, dist_backend)


def _local_rank(rank: int) -> int:
    """LOCAL_RANK; a launcher that sets only RANK: from LOCAL_WORLD_SIZE or the GPUs of this node.

    Ranks are numbered node by node (torchrun, deepspeed and srun all do), so rank modulo the
    ranks per node is the local rank. Without either, as before: the rank (one node).
    """
    env = os.environ
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    per_node = int(env.get("LOCAL_WORLD_SIZE") or 0)
    if not per_node and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    return rank % per_node if per_node > 0 else rank


def _first_slurm_host() -> str:
    """The allocation's first node (the rendezvous host) when srun started the ranks directly."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    raise ConfigError(
        "started by srun without MASTER_ADDR, and the first node of the allocation "
        "could not be found: export MASTER_ADDR (or use `dtrain slurm`)"
    )


def pg_timeout(cfg) -> timedelta:
    """`backend.timeout_s` as the process group's timeout: how long a collective (a save, an
    evaluation, a rank that died) may keep the other ranks waiting before the job fails."""
    return timedelta(seconds=cfg.backend.timeout_s)


def ensure_rendezvous(env: DistEnv) -> None:
    """One process started without a launcher: a one-rank rendezvous on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


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
