"""Metric loggers: what TensorBoard, MLflow and W&B (offline) store reads back equal to
metrics.jsonl; the loss curve is written; a missing logger package is one line, exit 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dtrain.loggers import scalars
from tests.helpers import metrics, train

LOGGED = [
    "training.eval_every=2",
    "training.memory_every=2",
    "logging.backends=[tensorboard,mlflow,wandb]",
    "logging.project=dtrain-test",
    "logging.loss_curve=true",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loggers") / "run"
    train(out, LOGGED)
    return out


def expected(out: Path) -> dict[str, dict[int, float]]:
    """metric name -> {step: value}, from metrics.jsonl through the loggers' flattening rule."""
    table: dict[str, dict[int, float]] = {}
    for row in metrics(out):
        for name, value in scalars(row).items():
            table.setdefault(name, {})[row["step"]] = value
    return table


def test_metrics_jsonl_has_what_is_logged(run):
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows[1:]:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction", "step_time_s"} <= r.keys()
        assert "mfu" not in r  # CPU: no MFU
    assert "eval_loss" in rows[0] and "eval_loss" in rows[2] and "memory" in rows[4]
    table = expected(run)
    assert table["memory/rank0/frozen_weights"][2] == rows[2]["memory"]["ranks"][0]["frozen_weights"]


def test_tensorboard_events_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    table = expected(run)
    assert set(acc.Tags()["scalars"]) == set(table)
    for name, by_step in table.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == {s: float(np.float32(v)) for s, v in by_step.items()}, name  # TB stores float32


def test_mlflow_file_store_equals_metrics_jsonl(run):
    runs = [p for p in (run / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1
    metrics_dir = runs[0] / "metrics"
    table = expected(run)
    stored = {str(p.relative_to(metrics_dir)) for p in metrics_dir.rglob("*") if p.is_file()}
    assert stored == set(table)
    for name, by_step in table.items():
        lines = (metrics_dir / name).read_text().split()
        got = {int(lines[i + 2]): float(lines[i + 1]) for i in range(0, len(lines), 3)}  # time value step
        assert got == by_step, name
    assert (runs[0] / "tags" / "mlflow.runName").read_text() == "run"
    assert (runs[0] / "params" / "lora.r").read_text() == "8"


def wandb_history(run_file: Path) -> list[dict]:
    """History records of a .wandb file (LevelDB-log framing: 7-byte file header, 32 KiB blocks,
    records of crc32, length, type (1 full, 2 first, 3 middle, 4 last) + a protobuf Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_history_equals_metrics_jsonl(run):
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    for row in wandb_history(run_file):
        for name, value in row.items():
            if not name.startswith("_"):
                got.setdefault(name, {})[row["_step"]] = value
    assert got == expected(run)


def test_loss_curve_png(run):
    from dtrain.loggers import curve

    png = run / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    train_curve, eval_curve = curve.read_curves(run / "metrics.jsonl")
    assert [s for s, _ in train_curve] == [1, 2, 3, 4] and [s for s, _ in eval_curve] == [0, 2, 4]


def test_missing_logger_package_is_one_line(tmp_path):
    """An uninstalled package (blocked the way Python blocks an import: sys.modules[name] = None)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    from tests.helpers import REPO

    proc = train(
        tmp_path / "out", ["logging.backends=[tensorboard,mlflow]"], check=False, env={"PYTHONPATH": f"{site}:{REPO}"}
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlflow-skinny" in lines[0] and "logging.backends" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_log_once_and_overwrite_clears_logger_files(tmp_path):
    out = tmp_path / "run"
    train(
        out,
        [
            "backend.name=fsdp",
            "training.eval_every=2",
            "logging.backends=[tensorboard,mlflow]",
            "logging.loss_curve=true",
        ],
        nproc=2,
        launcher="torchrun",
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0 only
    assert len([p for p in (out / "mlruns").glob("*/*") if (p / "metrics").is_dir()]) == 1
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    table = expected(out)
    assert {e.step: e.value for e in acc.Scalars("loss")} == {s: float(np.float32(v)) for s, v in table["loss"].items()}
    first_png = (out / "loss_curve.png").read_bytes()
    train(
        out,
        ["training.max_steps=2", "output.overwrite=true", "logging.backends=[tensorboard]", "logging.loss_curve=true"],
    )
    assert not (out / "mlruns").exists() and len(list((out / "tensorboard").iterdir())) == 1
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert (out / "loss_curve.png").read_bytes() != first_png


@pytest.mark.slow
def test_resume_purges_tensorboard_steps_after_the_checkpoint(tmp_path):
    """A run that dies after step 4's metrics but before its checkpoint resumes from step 2: TensorBoard,
    like metrics.jsonl, then holds steps 1-4 once, the rerun's values."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["training.save_every=2", "training.keep_last=3", "logging.backends=[tensorboard]", "lora.dropout=0.1"]
    train(out, args)
    first = {r["step"]: r["loss"] for r in metrics(out)}
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    # another dropout rate (a resume may change it, unlike the seed): the rerun's losses differ
    train(out, [*args, "training.resume=auto", "lora.dropout=0.3"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[3]["loss"] != first[4]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(r["step"], float(np.float32(r["loss"]))) for r in rows]
