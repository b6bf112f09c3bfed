"""One optimizer step, the same for the trainer, the memory profiler and the test probes.

The loss of a step is the mean next-token loss over every labelled token of the global batch (all
micro-batches of all ranks): each micro-batch's summed loss is scaled by world / global tokens, so
the gradients the backends average over ranks are those of one big batch, whatever the split.
"""

from __future__ import annotations

import contextlib
import math

import torch

from dtrain.data.rows import IGNORE


class StepWatch:
    """What the memory profiler observes in a step: around the first micro-batch's forward, and
    right before the optimizer step (gradients and optimizer state present)."""

    def forward(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def before_optimizer_step(self) -> None:
        pass


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are a next-token target (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def train_step(backend, batches: list[dict[str, torch.Tensor]], real_tokens: int = 0,
               watch: StepWatch | None = None, poison: bool = False) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches, then the optimizer step.

    Returns the global mean loss, the learning rate used, the gradient norm before clipping, the
    global counts of labelled and of real (non-pad; `real_tokens` is this rank's) tokens, and
    `nonfinite`: "" or what was not finite ("loss", "grad_norm"), the same on every rank since
    both are global values; such a step updates nothing. `poison`: a planted NaN (dtrain/faults.py).
    """
    local = torch.tensor([sum(labelled_tokens(b) for b in batches), real_tokens], dtype=torch.float64)
    global_tokens, global_real = (int(v) for v in backend.all_reduce_sum(local))
    scale = backend.world_size / max(global_tokens, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        with watch.forward() if watch is not None and i == 0 else contextlib.nullcontext():
            total, _ = backend.loss(batch)
        if poison:
            total = total * float("nan")
        backend.backward(total * scale)
        loss_sum += total.detach().double().cpu()
    if watch is not None:
        watch.before_optimizer_step()
    lr = backend.lr
    loss = float(backend.all_reduce_sum(loss_sum).item()) / max(global_tokens, 1)  # before the step: it may skip
    norm = backend.step(skip=not math.isfinite(loss))
    bad = [name for name, v in (("loss", loss), ("grad_norm", norm)) if not math.isfinite(v)]
    return {"loss": loss, "lr": lr, "grad_norm": norm, "labelled_tokens": global_tokens,
            "real_tokens": global_real, "nonfinite": " and ".join(bad)}


