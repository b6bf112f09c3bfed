"""Metric loggers behind one interface (`MetricLogger`: log(row, step), close()).

`logging.backends` chooses them, several at once; metrics.jsonl (JSONL) is always written.
Each backend is an optional package (`pip install dtrain[loggers]`): `check_installed` names
the pip package of a missing one at config load, before anything heavy starts. Only rank 0
creates loggers (the trainer decides; nothing here asks for the rank).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError
from dtrain.loggers.base import MetricLogger, MultiLogger, scalars
from dtrain.storage import outdir

# backend -> (module it imports, pip package that provides it)
REQUIRES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}

__all__ = ["MetricLogger", "MultiLogger", "scalars", "REQUIRES", "chosen", "check_installed", "create"]


def chosen(backends: list[str] | str) -> list[str]:
    """The configured backends in order, jsonl first and once."""
    names = [backends] if isinstance(backends, str) else list(backends)
    return ["jsonl"] + [n for i, n in enumerate(names) if n != "jsonl" and n not in names[:i]]


def check_installed(backends: list[str] | str, where: str = "logging.backends") -> None:
    """One ConfigError line naming the pip package of the first configured backend not installed."""
    for name in chosen(backends):
        if name in REQUIRES:
            module, package = REQUIRES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{where}: {name} needs the '{package}' package: pip install {package} "
                    "(or pip install 'dtrain[loggers]')"
                )


def create(cfg: Any, out: Path, start_step: int = 0) -> MultiLogger:
    """The run's loggers (rank 0 only): metrics.jsonl plus each configured backend. `start_step`:
    the step a resumed run continues from (0: a new run)."""
    from dtrain.loggers.jsonl import JsonlLogger

    lc = cfg.logging
    check_installed(lc.backends)
    run_name = lc.run_name or Path(cfg.output.dir).resolve().name
    loggers: list[MetricLogger] = []
    try:
        for name in chosen(lc.backends):
            if name == "jsonl":
                loggers.append(JsonlLogger(out / outdir.METRICS))
            elif name == "tensorboard":
                from dtrain.loggers.tensorboard_logger import TensorBoardLogger

                loggers.append(TensorBoardLogger(out / "tensorboard", start_step + 1 if start_step else None))
            elif name == "mlflow":
                from dtrain.loggers.mlflow_logger import MlflowLogger

                loggers.append(
                    MlflowLogger(lc.mlflow_uri, out / "mlruns", lc.project, run_name, dataclasses.asdict(cfg))
                )
            elif name == "wandb":
                from dtrain.loggers.wandb_logger import WandbLogger

                loggers.append(WandbLogger(out, lc.project, run_name, lc.wandb_mode, dataclasses.asdict(cfg)))
    except BaseException:
        MultiLogger(loggers).close()
        raise
    return MultiLogger(loggers)
