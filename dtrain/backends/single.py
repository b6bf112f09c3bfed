"""One process, one device: no sharding. The reference the sharded backends must match."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtrain.backends.base import Backend
from dtrain.model import build as model_lib


class SingleBackend(Backend):
    def _materialize(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        model.to_empty(device=self.device)
        model_lib.restore_buffers(model, self.device)
        model_lib.fill_full(model, source)
        model.tie_weights()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def full_state(self, names: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if names(n)}

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
