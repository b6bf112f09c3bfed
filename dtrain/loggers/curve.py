"""loss_curve.png: train and eval loss against the step, from metrics.jsonl (matplotlib, Agg
canvas: no display, no global backend switch)."""

from __future__ import annotations

import json
from pathlib import Path


def read_curves(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as [(step, loss)] from a metrics.jsonl; a resumed run's repeated steps keep
    their last value."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    return sorted(train.items()), sorted(evals.items())


def write_loss_curve(metrics: Path, png: Path) -> Path | None:
    """Plot metrics.jsonl's train and eval loss into `png`; None when there is nothing to plot."""
    if not metrics.is_file():
        return None
    train, evals = read_curves(metrics)
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    return png
