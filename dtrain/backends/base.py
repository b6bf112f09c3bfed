"""The one interface the trainer talks to. What a backend must do:

* place and shard: `_build`, one sequence for every backend (build empty, `assembly.assemble`,
  `_shard`, `_materialize`: storage and weights), with hooks a backend overrides;
* step: `forward` / `loss`, `backward`, `step` (the torch optimizer path is here; `optim` makes
  the optimizer and schedule);
* gather LoRA tensors and save / load its state: `full_state`, `load_full_state`,
  `full_optimizer_state`, `load_full_optimizer_state` (any world size);
* collectives: `all_reduce_sum`, `barrier`, `close` (backends/collectives.py for process groups).

What the memory profiler reads (local storage by name) is backends/memory_view.py's; model
assembly is dtrain/training/assembly.py's. Subclasses fill in the `_`-prefixed steps.
"""

from __future__ import annotations

import contextlib
import gc
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from dtrain.backends.env import DistEnv
from dtrain.backends.memory_view import TorchMemoryView
from dtrain.config.schema import Config
from dtrain.model import build as model_lib, layers
from dtrain.training import assembly, logps as logps_lib, loss as loss_lib, optim, reference


class Backend(TorchMemoryView, ABC):
    """Single process, FSDP2 or DeepSpeed ZeRO-3 behind the same calls."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def device(self) -> torch.device:
        return self.env.device

    # ---- lifecycle -------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """Build the model empty, add LoRA, shard, then fill the weights; returns the module."""
        config = model_lib.hf_config(self.cfg.model)
        self.model = self._build(config)
        initial = reference.initial_tensors(self.model, self.cfg)  # lora.init_from, dpo.reference's adapter
        if initial:
            self.load_full_state(initial)
        return self.model

    def setup_optimizer(self, total_steps: int) -> None:
        """AdamW over the trainable (LoRA) parameters only, with warmup + cosine."""
        self._setup_optimizer(total_steps, self.schedule(total_steps))

    def schedule(self, total_steps: int) -> Callable[[int], float]:
        return optim.schedule(self.cfg, total_steps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- per step ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a micro-batch (autocast to bf16 where the config asks and the device has it)."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        with self.autocast():
            return self.model(**batch, use_cache=False).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed next-token loss, labelled tokens) of a micro-batch. With the chunked loss
        installed in the head (dtrain/training/loss.py) the model's forward returns that sum itself and no
        logits of the whole micro-batch ever exist; otherwise it is computed from the logits."""
        head = layers.output_head(self.model)
        if not loss_lib.installed(head):
            return loss_lib.token_loss(self.forward(batch), batch["labels"])
        shifted = loss_lib.shift(batch["labels"]).to(self.device)
        with loss_lib.labels(head, shifted):
            total = loss_lib.check_passed_through(head, self.forward(batch), self.model.config.model_type)
        return total, loss_lib.labelled_tokens(batch["labels"])

    def row_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log p of each row's labelled tokens [rows], labelled tokens per row [rows]),
        chunked in the head when the chunked loss is installed (no logits of the micro-batch)."""
        head = layers.output_head(self.model)
        shifted = loss_lib.shift(batch["labels"]).to(self.device)
        if loss_lib.installed(head):
            with loss_lib.labels(head, shifted, per_token=True):
                tokens = self.forward(batch)
        else:
            tokens = logps_lib.from_logits(self.forward(batch), shifted)
        return logps_lib.row_sums(tokens, shifted)

    @contextlib.contextmanager
    def evaluating(self):
        """Forward-only passes: the model in eval mode inside, back in train mode after."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def autocast(self):
        wants = self.cfg.model.dtype == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=wants)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (already scaled by the trainer; FSDP2 reduce-scatters
        and averages them over ranks during backward)."""
        loss.backward()

    def step(self, skip: bool = False) -> float:
        """Clip, optimizer step, scheduler step, zero grads; returns the grad norm before clipping.

        The torch optimizer's path (single process, FSDP2). `max_grad_norm` 0 clips at infinity:
        the scale clamps to 1, so the gradients are unchanged and the norm is still reported. Under
        FSDP2 the norm is a DTensor: its full value is the same on every rank. A non-finite norm
        (or `skip`: the loss was not finite) drops the gradients and steps neither the optimizer
        nor the schedule, as DeepSpeed does with an overflow: one decision on every rank.
        """
        max_norm = self.cfg.training.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm if max_norm > 0 else math.inf)
        full = getattr(norm, "full_tensor", None)
        norm = float(full() if callable(full) else norm)
        if not skip and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @abstractmethod
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (returned, every rank)."""

    @abstractmethod
    def full_state(self, names: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors of the parameters whose names pass the filter, every rank."""

    @abstractmethod
    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set parameters (by model name) from full tensors, each rank keeping its shard."""

    @abstractmethod
    def optimizer_state(self) -> dict:
        """This rank's optimizer and scheduler state (tensors and plain data)."""

    @abstractmethod
    def load_optimizer_state(self, state: dict) -> None: ...

    def full_optimizer_state(self) -> dict:
        """The optimizer and scheduler state in a form independent of backend and world size (every
        rank calls it: it may gather). {"params": {param name: {"exp_avg": full T, "exp_avg_sq": full
        T, "step": float}}, "hyper": lr, betas, ... of the (single) group, "scheduler": LambdaLR state}.
        This implementation serves torch optimizers (single process, FSDP2); ZeRO-3 overrides it."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = {}
        for p in self.trainable_parameters():  # same order on every rank: gathers match
            st = self.optimizer.state.get(p, {})
            if "exp_avg" in st:
                params[names[id(p)]] = {
                    "step": float(st["step"]),
                    **{k: self._full_tensor(st[k]).detach().cpu().clone() for k in ("exp_avg", "exp_avg_sq")},
                }
        return {
            "params": params,
            "hyper": optim.hyper(self.optimizer.param_groups[0]),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_full_optimizer_state(self, state: dict) -> None:
        """Restore what `full_optimizer_state` returned, written by any backend on any world size
        (plus "step" and "world_size" of the checkpoint), each rank taking its shard."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.trainable_parameters():
            saved = state["params"].get(names[id(p)])
            if saved is not None:
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(saved["step"]), dtype=torch.float32),
                    **{k: self._local_like(p, saved[k].to(p.dtype)) for k in ("exp_avg", "exp_avg_sq")},
                }
        for group in self.optimizer.param_groups:
            optim.set_hyper(group, state["hyper"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """An optimizer-state tensor in full (FSDP2 gathers its DTensor)."""
        return t

    def _local_like(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full optimizer-state tensor of parameter `p`, laid out like `p`."""
        return full.to(p.device)

    @abstractmethod
    def barrier(self) -> None: ...

    def long_barrier(self, timeout_s: int) -> Callable[[], None]:
        """A barrier with its own timeout, for waiting on rank 0's data preparation (one process: none)."""
        return self.barrier

    @abstractmethod
    def close(self) -> None:
        """Tear down process groups; safe to call twice."""

    # ---- the build sequence, written once; the hooks below say what a backend does differently -
    def _build(self, config) -> nn.Module:
        cfg = self.cfg
        model = self._build_empty(config)
        assembly.assemble(model, cfg)  # quantize, add LoRA, freeze, step options: before any sharding
        # the source is matched against the whole model's names and ties before FSDP2 replaces its
        # parameters by DTensors (ZeRO-3's build-time partitions keep theirs: ds_shape is read)
        source = model_lib.ModelSource(model_lib.base_source(cfg.model, model, cfg.training.seed), model)
        self._shard(model)
        self._materialize(model, source)
        return model

    def _build_empty(self, config) -> nn.Module:
        """The model without storage (meta device): nothing is allocated before sharding."""
        return model_lib.build_empty(
            config, model_lib.DTYPES[self.cfg.model.dtype], trust_remote_code=self.cfg.model.trust_remote_code
        )

    def _shard(self, model: nn.Module) -> None:
        """Cut the model's parameters over the ranks (one process: nothing to do)."""

    @abstractmethod
    def _materialize(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        """Storage for this rank's part of every parameter and buffer, filled from `source`."""

    def _setup_optimizer(self, total_steps: int, schedule: Callable[[int], float]) -> None:
        """torch AdamW over the trainable parameters and a LambdaLR (DeepSpeed hands both to its engine)."""
        self.optimizer = optim.make_adamw(optim.optimizer_groups(self.model, self.cfg), self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def release(self) -> None:
        """Drop the model, optimizer and scheduler but keep the process group, so that another
        model can be built in this process (`dtrain memory` runs several modes one after the
        other). Backends holding more (a DeepSpeed engine) override and call super()."""
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
