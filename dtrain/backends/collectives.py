"""The collectives the trainer needs from a multi-process backend (FSDP2 and ZeRO-3 alike):
a sum over ranks, a barrier, and the teardown of the process group; and the process group's
start after a torchrun restart."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def restarted() -> int:
    """torchrun's restart count of this worker when it runs on the agent's store, else 0."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return 0
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restart_store(world_size: int, timeout: timedelta):
    """After a torchrun restart (`--max-restarts`), a store for this attempt's process group; None
    otherwise (env:// as usual). torch's env:// init on the agent's store adds no per-attempt prefix
    ("a new TCPStore for every retry"), but torchrun's rendezvous handlers keep one store across
    restarts: the restarted ranks read the dead group's gloo addresses and hang or fail to connect.
    The prefix makes every attempt's keys its own."""
    attempt = restarted()
    if not attempt:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/dtrain/attempt_{attempt}", store)


def init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta, **kw) -> None:
    """torch.distributed.init_process_group, with the restart store where there is one."""
    store = restart_store(world_size, timeout)
    extra = {"store": store} if store is not None else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **extra, **kw)


class ProcessGroupCollectives:
    """Mixed into a Backend that runs in a torch.distributed process group (`self.env`)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks, on every rank, on `t`'s device (NCCL reduces on the GPU)."""
        comm = self.env.device if self.env.dist_backend == "nccl" else torch.device("cpu")
        out = t.detach().clone().to(comm)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group; safe to call twice."""
        if dist.is_initialized():
            dist.destroy_process_group()
