"""One optimizer step, the same for the trainer, the memory profiler and the test probes.

The loss of a step is the mean next-token loss over every labelled token of the global batch (all
micro-batches of all ranks): each micro-batch's summed loss is scaled by world / global tokens, so
the gradients the backends average over ranks are those of one big batch, whatever the split.
"""

from __future__ import annotations

import contextlib
import math

import torch

from dtrain.training import loss as loss_lib


class StepWatch:
    """What the memory profiler observes in a step: around the first micro-batch's forward, and
    right before the optimizer step (gradients and optimizer state present)."""

    def forward(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def before_optimizer_step(self) -> None:
        pass


class SFT:
    """The next-token objective: the loss is the mean over labelled tokens. An objective says what
    the step's mean is over (`count`) and gives a micro-batch's summed loss plus metric sums
    (`loss`); dpo.DPO is the other one."""

    name = "sft"
    metric_names: tuple[str, ...] = ()

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_lib.labelled_tokens(batch["labels"])

    def loss(self, backend, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return backend.loss(batch)[0], torch.zeros(0, dtype=torch.float64)


def objective(cfg):
    """The step's objective: next-token (sft) or preference pairs (dpo)."""
    if cfg.objective == "dpo":
        from dtrain.training import dpo

        return dpo.DPO(cfg)
    return SFT()


def train_step(
    backend,
    batches: list[dict[str, torch.Tensor]],
    real_tokens: int = 0,
    watch: StepWatch | None = None,
    objective=None,
    poison: bool = False,
) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches, then the optimizer step.

    Returns the global mean loss (over labelled tokens, or the objective's units: pairs), the
    learning rate used, the gradient norm before clipping, the global counts of labelled and of
    real (non-pad; `real_tokens` is this rank's) tokens and of the positions computed (micro-batches
    are cut to their longest row, so these vary by step), the objective's metrics (global means),
    and `nonfinite`: "" or what was not finite ("loss", "grad_norm"), the same on every rank since
    both are global values; such a step updates nothing. `poison`: a planted NaN (dtrain/faults.py).
    """
    objective = objective or SFT()
    units = sum(objective.count(b) for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)
    local = torch.tensor(
        [units, sum(loss_lib.labelled_tokens(b["labels"]) for b in batches), real_tokens, positions],
        dtype=torch.float64,
    )
    global_units, global_tokens, global_real, global_positions = (int(v) for v in backend.all_reduce_sum(local))
    scale = backend.world_size / max(global_units, 1)
    sums = torch.zeros(1 + len(objective.metric_names), dtype=torch.float64)  # loss, then the metrics
    for i, batch in enumerate(batches):
        with watch.forward() if watch is not None and i == 0 else contextlib.nullcontext():
            total, extra = objective.loss(backend, batch)
        if poison:
            total = total * float("nan")
        backend.backward(total * scale)
        sums += torch.cat([total.detach().double().cpu().reshape(1), extra])
    if watch is not None:
        watch.before_optimizer_step()
    lr = backend.lr
    means = (backend.all_reduce_sum(sums) / max(global_units, 1)).tolist()  # before the step: it may skip
    norm = backend.step(skip=not math.isfinite(means[0]))
    bad = [name for name, v in (("loss", means[0]), ("grad_norm", norm)) if not math.isfinite(v)]
    return {
        "loss": means[0],
        "lr": lr,
        "grad_norm": norm,
        "labelled_tokens": global_tokens,
        "real_tokens": global_real,
        "positions": global_positions,
        **dict(zip(objective.metric_names, means[1:])),
        "nonfinite": " and ".join(bad),
    }
