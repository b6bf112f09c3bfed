"""Output locations: never overwrite an earlier result unless asked.

`check_run_dir` is called by `dtrain train` on every rank before anything is written: an
`output.dir` that holds an earlier run (its checkpoints, adapter, config or metrics) is refused
unless `training.resume=auto` (continue it) or `output.overwrite=true` (replace it: `clear_run`
removes the earlier run's files first, so nothing of it is mixed into the new one).
`check_target` does the same for the single files and directories other commands write
(`dtrain merge --out`, `dtrain memory --out`, `dtrain slurm --out`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dtrain.errors import ConfigError, DtrainError

METRICS = "metrics.jsonl"  # a run's metrics, one JSON row per logged step, in output.dir
# What a run writes into output.dir (and its staging names: files.write_text_atomic, files.publish).
RUN_FILES = (
    "checkpoints",
    "adapter",
    "config.yaml",
    METRICS,
    "tokenizer",
    "PREEMPTED",
    "tensorboard",
    "mlruns",
    "wandb",
    "loss_curve.png",
)  # the last four: dtrain.loggers
_RUN_LEFTOVERS = (".tmp-adapter", ".old-adapter", ".config.yaml.tmp", ".metrics.jsonl.tmp", ".PREEMPTED.tmp")


def earlier_run(out: Path) -> list[str]:
    """The names of an earlier run's files present in `out` (none: a fresh directory)."""
    if not out.is_dir():
        return []
    return [name for name in RUN_FILES if (out / name).exists()]


def check_writable_dir(path: Path, what: str) -> None:
    """`path` is a directory that can be written, or one that can be created (one line if not)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} = '{path}': exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} = '{path}': '{existing}' is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} = '{path}': '{existing}' is not writable")


def check_run_dir(cfg) -> None:
    """Refuse an output.dir that would lose or mix up an earlier run's files."""
    out = Path(cfg.output.dir)
    check_writable_dir(out, "output.dir")
    overwrite, resume = cfg.output.overwrite, cfg.training.resume
    if overwrite and resume == "auto":
        raise ConfigError(
            "output.overwrite = true and training.resume = auto contradict each other: "
            "overwrite starts afresh, resume continues; choose one"
        )
    found = earlier_run(out)
    if found and not overwrite and resume != "auto":
        raise ConfigError(
            f"output.dir = '{out}' holds an earlier run ({', '.join(found)}); use "
            "training.resume=auto to continue it, output.overwrite=true to replace it, "
            "or another output.dir"
        )


def clear_run(out: Path) -> None:
    """Remove an earlier run's files from `out` (only those dtrain writes; others are kept)."""
    for name in RUN_FILES + _RUN_LEFTOVERS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_target(path: Path, flag: str, overwrite: bool, kind: str = "file") -> None:
    """An output file (`kind` "file") or directory ("dir") of a command: refused when it would
    replace something already there, unless `overwrite` (the command's --overwrite)."""
    if kind == "file":
        if path.is_dir():
            raise DtrainError(f"{flag} '{path}': is a directory; name the file to write")
        if path.exists() and not overwrite:
            raise DtrainError(f"{flag} '{path}': file exists; pass --overwrite to replace it")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise DtrainError(f"{flag} '{path}': '{parent}' is a file, not a directory")
        return
    if path.exists() and not path.is_dir():
        raise DtrainError(f"{flag} '{path}': exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DtrainError(f"{flag} '{path}': directory is not empty; pass --overwrite to replace what it holds")
