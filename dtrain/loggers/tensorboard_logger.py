"""TensorBoard event files in <output.dir>/tensorboard (scalars; TensorBoard stores float32).

A resumed run passes `purge_step` (the first step it writes again): TensorBoard then drops the
earlier run's events from that step on, as dtrain.training.checkpoint.trim_metrics does for metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtrain.loggers.base import scalars


class TensorBoardLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, row: dict[str, Any], step: int) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
