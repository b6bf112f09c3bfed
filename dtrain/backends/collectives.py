"""The collectives the trainer needs from a multi-process backend (FSDP2 and ZeRO-3 alike):
a sum over ranks, a barrier, and the teardown of the process group."""

from __future__ import annotations

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

    def close(self) -> None:
        """Tear down the process group; safe to call twice."""
        if dist.is_initialized():
            dist.destroy_process_group()
