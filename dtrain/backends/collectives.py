"""The collectives the trainer needs from a multi-process backend (FSDP2 and ZeRO-3 alike):
a sum over ranks, a barrier, and the teardown of the process group; and the process group's
start after a torchrun restart."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from dtrain.errors import DiskFull, DtrainError


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
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
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


def together(backend, fn, every_rank: bool = False, what: str = "checkpoint write") -> None:
    """Run `fn` on rank 0 (or on every rank), then let all ranks learn whether it failed, so that a
    write error on one rank (disk full, permissions) ends every rank instead of leaving the others
    waiting at the next collective. Also a barrier. `what` names the work in the error line."""
    error: BaseException | None = None
    if every_rank or backend.rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    failed = int(backend.all_reduce_sum(torch.tensor(1.0 if error else 0.0)).item())
    if error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            error = DiskFull(f"no space left on device writing {error.filename or 'a checkpoint'}")
        elif isinstance(error, OSError):
            error = DtrainError(f"{what} failed: {error}")
        if isinstance(error, DtrainError):
            error.local = backend.rank != 0  # this rank's own failure: printed here, not only on rank 0
            raise error from None
        raise error
    if failed:
        raise DtrainError(f"{what} failed on {failed} other rank(s); see their error")
