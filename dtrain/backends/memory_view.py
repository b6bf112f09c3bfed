"""What the memory profiler (dtrain/memory/measure.py) reads of a backend: this rank's storage of
every parameter, gradient and optimizer tensor, by name. The default here serves torch
optimizers over plain or DTensor parameters (single process, FSDP2); ZeRO-3, which keeps its
partitions and fp32 masters apart, overrides all three (backends/deepspeed.py).
"""

from __future__ import annotations

import torch


class TorchMemoryView:
    """Mixed into a Backend (`self.model`, `self.optimizer`)."""

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's local storage of every parameter (shards where sharded), for the memory report."""
        return {n: p.data for n, p in self.model.named_parameters()}

    def local_grads(self) -> dict[str, torch.Tensor]:
        """This rank's gradient storage, by parameter name, as it stands after backward and before
        `step()` (local shards of DTensor grads). Backends that keep gradients outside `.grad`
        (ZeRO-3's partitioned fp32 grads) override this."""
        return {n: _local(p.grad) for n, p in self.model.named_parameters() if p.grad is not None}

    def local_optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer-held tensors, keyed `param_name/state_key`: every tensor in
        `optimizer.state` (local shards), plus fp32 master copies where a backend keeps them
        (override: ZeRO-3, or bf16 with fp32 masters)."""
        if self.optimizer is None:
            return {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"{names.get(id(p), id(p))}/{key}"] = _local(value)
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (its `to_local()`), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
