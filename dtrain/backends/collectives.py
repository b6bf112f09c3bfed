"""The collectives the trainer needs from a multi-process backend (FSDP2 and ZeRO-3 alike):
a sum over ranks, a barrier, and the teardown of the process group."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist


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

    def long_barrier(self, timeout_s: int) -> Callable[[], None]:
        """A barrier for waiting on rank 0's data preparation, in a gloo group of its own whose timeout
        is `timeout_s`, not the process group's (a first tokenization may take longer than any
        training collective should). The group is made now, while every rank is here."""
        if not dist.is_initialized():
            return lambda: None
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return lambda: dist.barrier(group=group)

    def close(self) -> None:
        """Tear down the process group; safe to call twice."""
        if dist.is_initialized():
            dist.destroy_process_group()
