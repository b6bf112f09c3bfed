"""The one interface the trainer talks to. Each backend owns process groups, sharding,
optimizer, backward and step, and the gathering of LoRA tensors.

Public methods are the lifecycle; subclasses fill in the `_`-prefixed steps.
"""

from __future__ import annotations

import contextlib
import gc
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from dtrain import lora, loss as loss_lib, model as model_lib, presets, step_opts
from dtrain.config import Config
from dtrain.dist import DistEnv


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Backend(ABC):
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
        return self.model

    def prepare(self, model: nn.Module) -> None:
        """Quantize, add the adapter and freeze the base (mode lora), in place, before sharding."""
        cfg = self.cfg
        if cfg.quantization.bits in (8, 4):
            from dtrain import quant

            skip = quant.skip_rule(cfg.quantization.include_head)
            quant.quantize_model(model, cfg.quantization.bits, skip=skip)
        if cfg.mode == "lora":
            targets = cfg.lora.targets if cfg.lora.target_regex else presets.expand(model, cfg.lora.targets)
            names = lora.select_targets(model, targets, cfg.lora.target_regex)
            lora.inject(model, names, adapter_spec(cfg))
            lora.freeze_base(model)
        else:
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
        step_opts.apply(model, cfg)  # checkpointing policy, compiled blocks, chunked loss head

    def setup_optimizer(self, total_steps: int) -> None:
        """AdamW over the trainable (LoRA) parameters only, with warmup + cosine."""
        self._setup_optimizer(total_steps, self.schedule(total_steps))

    def schedule(self, total_steps: int) -> Callable[[int], float]:
        t = self.cfg.training
        return lambda s: lr_factor(s, t.warmup_steps, total_steps, t.min_lr_ratio)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one (every trainable parameter at training.lr), or
        with LoRA+ (`lora.loraplus_lr_ratio`) two: A at lr, then B and DoRA's magnitude at
        lr x ratio. The schedule scales both alike (LambdaLR multiplies each group's initial lr)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        ratio = self.cfg.lora.loraplus_lr_ratio
        if self.cfg.mode != "lora" or ratio is None or ratio == 1:
            return [{"params": [p for _, p in named]}]
        lr = self.cfg.training.lr
        return [{"params": [p for n, p in named if not lora.is_loraplus_fast(n)], "lr": lr},
                {"params": [p for n, p in named if lora.is_loraplus_fast(n)], "lr": lr * ratio}]

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
        installed in the head (dtrain/loss.py) the model's forward returns that sum itself and no
        logits of the whole micro-batch ever exist; otherwise it is computed from the logits."""
        head = step_opts.output_head(self.model)
        if not loss_lib.installed(head):
            return loss_lib.token_loss(self.forward(batch), batch["labels"])
        shifted = loss_lib.shift(batch["labels"]).to(self.device)
        with loss_lib.labels(head, shifted):
            total = self.forward(batch)
        return total, int((shifted != loss_lib.IGNORE).sum())

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

    def step(self) -> float:
        """Clip, optimizer step, scheduler step, zero grads; returns the grad norm before clipping.

        The torch optimizer's path (single process, FSDP2). `max_grad_norm` 0 clips at infinity:
        the scale clamps to 1, so the gradients are unchanged and the norm is still reported. Under
        FSDP2 the norm is a DTensor: its full value is the same on every rank.
        """
        max_norm = self.cfg.training.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm if max_norm > 0 else math.inf)
        full = getattr(norm, "full_tensor", None)
        norm = full() if callable(full) else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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
                params[names[id(p)]] = {"step": float(st["step"]), **{k: self._full_tensor(st[k]).detach().cpu().clone()
                                                                      for k in ("exp_avg", "exp_avg_sq")}}
        return {"params": params, "hyper": _hyper(self.optimizer.param_groups[0]),
                "scheduler": self.scheduler.state_dict()}

    def load_full_optimizer_state(self, state: dict) -> None:
        """Restore what `full_optimizer_state` returned, written by any backend on any world size
        (plus "step" and "world_size" of the checkpoint), each rank taking its shard."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.trainable_parameters():
            saved = state["params"].get(names[id(p)])
            if saved is not None:
                self.optimizer.state[p] = {"step": torch.tensor(float(saved["step"]), dtype=torch.float32),
                                           **{k: self._local_like(p, saved[k].to(p.dtype)) for k in ("exp_avg", "exp_avg_sq")}}
        for group in self.optimizer.param_groups:
            _set_hyper(group, state["hyper"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """An optimizer-state tensor in full (FSDP2 gathers its DTensor)."""
        return t

    def _local_like(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full optimizer-state tensor of parameter `p`, laid out like `p`."""
        return full.to(p.device)

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Tear down process groups; safe to call twice."""

    # ---- subclass steps ---------------------------------------------------------------------
    @abstractmethod
    def _build(self, config) -> nn.Module: ...

    def _setup_optimizer(self, total_steps: int, schedule: Callable[[int], float]) -> None:
        """torch AdamW over the trainable parameters and a LambdaLR (DeepSpeed hands both to its engine)."""
        self.optimizer = make_adamw(self.optimizer_groups(), self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's local storage of every parameter (shards where sharded), for the memory report."""
        return {n: p.data for n, p in self.model.named_parameters()}

    # ---- memory report (dtrain/memory/measure.py) ----------------------------------------------
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

    def release(self) -> None:
        """Drop the model, optimizer and scheduler but keep the process group, so that another
        model can be built in this process (`dtrain memory` runs several modes one after the
        other). Backends holding more (a DeepSpeed engine) override and call super()."""
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (its `to_local()`), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def _hyper(group: dict) -> dict:
    """AdamW's hyper-parameters of a param group, plain data."""
    return {k: (list(group[k]) if isinstance(group[k], tuple) else float(group[k])) for k in HYPER if k in group}


def _set_hyper(group: dict, hyper: dict) -> None:
    for k, v in hyper.items():
        group[k] = tuple(v) if isinstance(v, list) else v


def adapter_spec(cfg: Config) -> lora.AdapterSpec:
    c = cfg.lora
    return lora.AdapterSpec(name=c.adapter_name, r=c.r, alpha=c.alpha, dropout=c.dropout, init_seed=c.init_seed,
                            use_rslora=c.use_rslora, use_dora=c.use_dora)


def make_adamw(params: list[nn.Parameter] | list[dict], cfg: Config) -> torch.optim.AdamW:
    t = cfg.training
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                             weight_decay=t.weight_decay)
