"""dtrain's FSDP2 backend at any world size in one process: a fake process group (torch's ``fake``
backend and ``FakeStore``, as torchtitan's dry runs use) and a meta-device model, so that 64 or 512
ranks of a 405B plan cost a few seconds and allocate nothing.

The real backend's build runs unchanged (``model.build_empty``, ``assembly.assemble``: quantized
storage, LoRA injection, freezing, the step options; then ``_shard``: ``fully_shard`` per decoder
block, embeddings, head, root) except ``_materialize``: the shards stay on the meta device, laid out
by FSDP2 exactly as on a real rank. Then dtrain's AdamW (``optim.make_adamw``) takes one step on
those meta shards, which creates its state. The gradients are placed as FSDP2's reduce-scatter
leaves them, a DTensor laid out like its parameter, because FSDP2 refuses to run forward on meta
parameters; ``forward_backward=True`` instead materializes the model as fake tensors
(``FakeTensorMode``: shapes, no storage) and runs a real forward and backward through the fake
collectives (slow at 70B: use it on small models; a test checks both paths give the same bytes).

What is read, for the simulated rank: every parameter's local shard (``to_local()``), every
gradient's, every optimizer-state tensor's, as numel x element size (meta and fake tensors have
no storage to measure, so their sizes are the bytes a real rank allocates); and the all-gather
buffer of each FSDP unit (every parameter's padded shard x N, in the unit's all-gather dtype).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dtrain.backends.env import DistEnv
from dtrain.backends.fsdp import FSDPBackend
from dtrain.config.schema import Config
from dtrain.model import build as model_lib


class SimulatedFSDP(FSDPBackend):
    """FSDPBackend whose shards stay on the meta device (or become fake tensors)."""

    fake = False

    def _materialize(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        if self.fake:  # shapes without storage, so that a real forward and backward can run
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True):
                model.to_empty(device="cpu")  # buffers too: fake, so the rotary tables need no values


@contextlib.contextmanager
def fake_group(rank: int, world: int) -> Iterator[None]:
    """A fake default process group of ``world`` ranks, this process being ``rank``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def simulate(cfg: Config, world: int, rank: int = 0, forward_backward: bool = False) -> dict[str, int]:
    """Bytes on ``rank`` of ``world`` FSDP2 ranks by category after one optimizer step of ``cfg``."""
    with fake_group(rank, world):
        backend = SimulatedFSDP(cfg, DistEnv(rank, world, 0, torch.device("cpu"), "fake"))
        backend.fake = forward_backward
        backend.build()
        backend.setup_optimizer(total_steps=1)
        if forward_backward:
            _forward_backward(backend)
        else:
            for p in backend.trainable_parameters():
                p.grad = torch.zeros_like(p)  # a DTensor sharded like p: FSDP2's reduce-scatter output
        backend.optimizer.step()
        return {**_state_bytes(backend), "gathered_unit": _largest_all_gather(backend.model)}


def simulate_zero3(cfg: Config, world: int, rank: int = 0) -> dict[str, int]:
    """The same for dtrain's ZeRO-3 backend: DeepSpeed runs unchanged on the fake group (its
    `init_distributed` adopts the existing group), and one real micro-batch, backward and step
    run through its engine. Unlike FSDP2's, ZeRO-3's partitions are real tensors, and zero.Init
    builds every parameter in full before it cuts it: only small models can be simulated so
    (docs/memory_estimate.md says why not 70B)."""
    from dtrain.backends.deepspeed import DeepSpeedBackend, _import_deepspeed

    cpu = torch.device("cpu")
    with fake_group(rank, world):
        _import_deepspeed(cpu).init_distributed(dist_backend="fake", auto_mpi_discovery=False)
        backend = DeepSpeedBackend(cfg, DistEnv(rank, world, 0, cpu, "fake"))
        backend.build()
        backend.setup_optimizer(total_steps=1)
        ids = torch.randint(0, int(backend.model.config.vocab_size), (cfg.training.micro_batch_size, cfg.data.seq_len))
        loss, _ = backend.loss({"input_ids": ids, "labels": ids})
        backend.backward(loss)
        grads = sum(_nbytes(t) for t in backend.local_grads().values())
        backend.step()
        params = dict(backend.model.named_parameters())
        local = backend.local_tensors()
        out = {
            "frozen_weights": sum(_nbytes(t) for n, t in local.items() if not params[n].requires_grad),
            "trainable_params": sum(_nbytes(t) for n, t in local.items() if params[n].requires_grad),
            "gradients": grads,
            "optimizer_state": sum(_nbytes(t) for t in backend.local_optimizer_tensors().values()),
        }
        out["model_states"] = sum(out.values())
        backend.release()
        return out


def _forward_backward(backend: SimulatedFSDP) -> None:
    """One micro-batch through the real forward and backward on fake tensors and fake collectives.
    The head returns logits (the chunked loss picks the labelled positions by value, which fake
    tensors do not have); the gradients reach the same parameters either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = backend.cfg.training
    with FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.zeros(t.micro_batch_size, backend.cfg.data.seq_len, dtype=torch.long)
        backend.forward({"input_ids": ids}).float().sum().backward()


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _state_bytes(backend: SimulatedFSDP) -> dict[str, int]:
    params = list(backend.model.named_parameters())
    out = {
        "frozen_weights": sum(_nbytes(p) for _, p in params if not p.requires_grad),
        "trainable_params": sum(_nbytes(p) for _, p in params if p.requires_grad),
        "gradients": sum(_nbytes(p.grad) for _, p in params if p.grad is not None),
        "optimizer_state": sum(
            _nbytes(v) for s in backend.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ),
    }
    out["model_states"] = sum(out.values())
    return out


def _largest_all_gather(model: nn.Module) -> int:
    """Bytes of the largest FSDP unit's all-gather output: each parameter's padded shard x N, in
    the policy's param dtype for floating parameters (their own dtype otherwise)."""
    largest = 0
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if callable(state) else None
        if group is None:
            continue
        cast = group.mp_policy.param_dtype
        total = 0
        for fp in group.fsdp_params:
            dtype = fp.sharded_param.dtype
            dtype = cast if cast is not None and dtype.is_floating_point else dtype
            total += (
                fp.padded_sharded_param_size.numel()
                * group.mesh_info.shard_mesh_size
                * torch.empty((), dtype=dtype).element_size()
            )
        largest = max(largest, total)
    return largest
