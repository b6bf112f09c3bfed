"""Weights & Biases: offline by default (files under <output.dir>/wandb, `wandb sync` uploads
them later); logging.wandb_mode = online sends them as the run goes (needs a login)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtrain.loggers.base import scalars


class WandbLogger:
    def __init__(self, out: Path, project: str, run_name: str, mode: str, config: dict[str, Any]) -> None:
        import wandb

        settings = wandb.Settings(console="off", x_disable_stats=True, disable_git=True, silent=True)
        self._run = wandb.init(
            mode=mode, dir=str(out), project=project, name=run_name, config=config, settings=settings
        )
        self.run_dir = Path(self._run.dir).parent  # <out>/wandb/offline-run-<time>-<id>

    def log(self, row: dict[str, Any], step: int) -> None:
        self._run.log(scalars(row), step=step)

    def close(self) -> None:
        self._run.finish()
