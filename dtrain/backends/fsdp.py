"""PyTorch FSDP2 (`fully_shard`): each decoder block, the embeddings and the head, then the root;
frozen and LoRA parameters in the same units. The model is built on the meta device, sharded, then each rank reads only its
rows of every tensor from the weight source, so no rank holds the full model in memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dtrain import faults
from dtrain.backends import collectives, env as dist_env
from dtrain.backends.base import Backend
from dtrain.backends.collectives import ProcessGroupCollectives
from dtrain.model import build as model_lib, layers


class FSDPBackend(ProcessGroupCollectives, Backend):
    def __init__(self, cfg, env) -> None:
        super().__init__(cfg, env)
        if not dist.is_initialized():
            dist_env.ensure_rendezvous(env)
            collectives.init_process_group(
                env.dist_backend,
                env.rank,
                env.world_size,
                dist_env.pg_timeout(cfg),
                device_id=env.device if env.device.type == "cuda" else None,
            )

    def _materialize(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        """Storage for this rank's shards, then its rows of the weights (a simulated backend on a
        fake process group, backends/simulate.py, keeps the meta shards instead)."""
        model.to_empty(device=self.device)
        model_lib.restore_buffers(model, self.device)
        self._fill(model, source)

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        for name, p in self.model.named_parameters():  # a planted fault (dtrain/faults.py) only
            if p.grad is not None and faults.dropped_grad(name):
                p.grad.zero_()

    def _shard(self, model: nn.Module) -> None:
        """Units: each decoder block, the input embeddings, the output head, then the root.

        Embeddings and head get units of their own (when untied) so that they are not left in the
        root unit, which FSDP2 keeps gathered from forward to the end of backward: the input
        embeddings are resharded after forward; the head is not (backward starts with it). Tied
        embeddings share one tensor and stay in the root unit; so does whatever a model does not
        name as its input / output embeddings.
        """
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.cfg.model.dtype == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in layers.decoder_blocks(model):
            fully_shard(block, mp_policy=policy)
        embed, head = _with_parameters(layers.input_embeddings(model)), _with_parameters(layers.output_head(model))
        if embed is not None and not (head is not None and _shares_parameters(embed, head)):
            fully_shard(embed, mp_policy=policy)
            if head is not None:
                fully_shard(head, mp_policy=policy, reshard_after_forward=False)
        fully_shard(model, mp_policy=policy)

    @contextlib.contextmanager
    def evaluating(self):
        with super().evaluating():
            yield
        self.reshard()

    def reshard(self) -> None:
        """Free every gathered unit. Forward-only passes (evaluation, generation) leave the units
        that reshard only after backward gathered (the root, and the untied head, whose
        `reshard_after_forward` is off for training): without this, a rank would hold the whole
        embedding until the next step's backward, and the end-of-run memory line would show it."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _fill(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        """Each rank reads only the rows of its own shard (FSDP2 shards dim 0 like torch.chunk)."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                rows = self._rows(p)
                if rows.stop > rows.start:
                    local.copy_(source.read(name, rows).to(local.dtype))

    def _rows(self, p: torch.Tensor) -> slice:
        if not isinstance(p, DTensor):
            return slice(0, p.shape[0] if p.dim() else 1)
        n = p.shape[0]
        chunk = math.ceil(n / self.world_size)
        start = min(self.rank * chunk, n)
        stop = start + p.to_local().shape[0]
        return slice(start, stop)

    def full_state(self, names: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.model.named_parameters():  # same order on every rank: collectives match
            if names(n):
                full = p.full_tensor() if isinstance(p, DTensor) else p
                out[n] = full.detach().cpu().clone()
        return out

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                p = params[n]
                local = p.to_local() if isinstance(p, DTensor) else p
                rows = self._rows(p)
                local.copy_(t[rows].to(local.dtype))

    def optimizer_state(self) -> dict:
        sd = self.optimizer.state_dict()
        state = {
            i: {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return {
            "optimizer": {"state": state, "param_groups": sd["param_groups"]},
            "scheduler": self.scheduler.state_dict(),
        }

    def load_optimizer_state(self, state: dict) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # state_dict's numbering
        opt = state["optimizer"]
        restored = {}
        for i, s in opt["state"].items():
            p = params[int(i)]
            restored[int(i)] = {k: _like(p, v) for k, v in s.items()}
        self.optimizer.load_state_dict({"state": restored, "param_groups": opt["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])

    def _full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    def _local_like(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """The rows of this rank's shard, as a DTensor laid out like `p` (any saved world size)."""
        return _like(p, full[self._rows(p)].contiguous()) if isinstance(p, DTensor) else full.to(p.device)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return {n: (p.to_local() if isinstance(p, DTensor) else p).data for n, p in self.model.named_parameters()}


def _with_parameters(module: nn.Module | None) -> nn.Module | None:
    return module if module is not None and any(True for _ in module.parameters()) else None


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    return bool({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})


def _like(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An optimizer-state tensor saved as a local shard, as a DTensor laid out like its parameter."""
    if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0:
        return DTensor.from_local(
            v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return v
