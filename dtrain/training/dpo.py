"""Direct Preference Optimization (Rafailov et al., 2023) on LoRA, the reference model for free.

For a pair (chosen c, rejected r) of a prompt, with log pi the summed log-probability of a
completion's scored tokens under the policy (the adapter being trained) and log ref under the
reference (the same model with the adapter off, or a frozen earlier adapter: dtrain/training/reference.py):

    z = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))
    sigmoid (DPO):  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)   (eps: label_smoothing)
    ipo:            (z - 1 / (2 beta))^2, on log-probabilities averaged per token (as TRL does)
    hinge:          max(0, 1 - beta z)

The reference log-probabilities come from a forward under torch.no_grad through the same model and
backend (same shards, same gathers), before the policy's forward: no second copy of the model.
The step's loss is the mean over every pair of the global batch (all micro-batches and ranks):
each micro-batch's summed pair losses are scaled by world / global pairs (dtrain/training/step.py), so one
process and N ranks give the same loss and update. Metrics use TRL's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.config.schema import Config
from dtrain.training import reference

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_losses(
    policy: torch.Tensor, ref: torch.Tensor, loss: str, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-pair losses from [P, 2] log-probabilities (column 0 chosen, 1 rejected)."""
    z = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    if loss == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * z)
    raise ValueError(f"unknown DPO loss {loss!r}")


def pair_metrics(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-metric sums over the pairs, in METRICS order (divided by the global pair count later)."""
    rewards = beta * (policy - ref).detach()
    c, r = rewards[:, 0], rewards[:, 1]
    p = policy.detach()
    return torch.stack([c.sum(), r.sum(), (c > r).float().sum(), (c - r).sum(), p[:, 0].sum(), p[:, 1].sum()])


class DPO:
    """The step's objective for preference pairs: rows 2k / 2k+1 of a micro-batch are pair k."""

    name = "dpo"
    metric_names = METRICS

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.d = cfg, cfg.dpo

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the micro-batch: what the step's loss is the mean over."""
        return batch["input_ids"].shape[0] // 2

    def _logps(self, backend, batch) -> torch.Tensor:
        sums, counts = backend.row_logps(batch)
        if self.d.loss == "ipo":  # IPO on per-token means
            sums = sums / counts.clamp(min=1).to(sums.dtype)
        return sums.view(-1, 2)

    def loss(self, backend, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed pair loss, per-metric sums) of a micro-batch."""
        with torch.no_grad(), reference.reference_pass(backend.model, self.cfg):
            ref = self._logps(backend, batch).detach()
        policy = self._logps(backend, batch)
        losses = pair_losses(policy.float(), ref.float(), self.d.loss, self.d.beta, self.d.label_smoothing)
        return losses.sum(), pair_metrics(policy.float(), ref.float(), self.d.beta).double().cpu()
