"""The logger interface and the row -> scalars rule every backend shares.

A trainer row is one line of metrics.jsonl: {"step": 3, "loss": 2.1, "lr": 1e-3, ...,
"memory": {"ranks": [{...}, ...]}}. Backends that take scalars (TensorBoard, MLflow, W&B) get
`scalars(row)`: every finite number, nested mappings and lists flattened with '/'
("memory/rank0/rss_peak_bytes"), under the same names as in metrics.jsonl. `step` is the x axis,
never a metric. Plain Python: no torch, no torch.distributed (only rank 0 ever creates a logger).
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class MetricLogger(Protocol):
    """What the trainer calls: log one row at a step, close at the end of the run."""

    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The row's finite numbers (bools and strings left out), flattened with '/'; no 'step'."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key == "step":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            out.update(scalars({f"{_list_label(key)}{i}": v for i, v in enumerate(value)}, prefix))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _list_label(key: str) -> str:
    """memory.ranks[0] -> memory/rank0: a list item is named by the singular of its key."""
    return key[:-1] if key.endswith("s") else key


class MultiLogger:
    """Several loggers as one: each row goes to every backend, in the configured order."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, row: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(row, step)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001 - close every backend, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]
