"""Unit tests for dtrain.memory.measure / report / measure_cli, in one process, no model build.

Expected bytes are computed here by hand from shapes (fp32 = 4 B per element).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from dtrain.backends.env import DistEnv
from dtrain.backends.single import SingleBackend
from dtrain.cli import memory as measure_cli
from dtrain.config import schema as config_lib
from dtrain.config.schema import Config
from dtrain.memory import measure, report
from tests.helpers import REPO, TINY

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dist_backend="gloo")


def test_held_bytes_counts_shared_bytes_once() -> None:
    a = torch.zeros(10, 10)
    assert measure.held_bytes([a, a[:5], a.t(), a.view(-1)]) == 400
    assert measure.held_bytes([a[2:4]]) == 80  # a view into a larger buffer: its own range only
    assert measure.held_bytes([a[0:3], a[2:5], a[8:]]) == (5 + 2) * 40  # union of row ranges
    assert measure.held_bytes([a, torch.zeros(3, dtype=torch.int8), None]) == 403


def test_saved_tensor_counter_excludes_parameters_and_dedups_views() -> None:
    lin = nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with measure.SavedTensorCounter(lin) as c:
        z = torch.relu(lin(x))  # mm saves x (128 B) and weight.t() (a parameter view)
        (z.view(-1) * z.view(-1)).sum()  # both operands are views of z's storage (256 B)
    assert c.activation_bytes == 4 * 8 * 4 + 4 * 16 * 4
    assert c.param_bytes == 16 * 8 * 4


def test_saved_tensor_counter_autocast_weight_copy_is_a_parameter() -> None:
    lin = nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with measure.SavedTensorCounter(lin) as c, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x)  # saves bf16 copies of x (an activation) and of the weight (not one)
    assert c.activation_bytes == 4 * 8 * 2
    assert c.param_bytes == 16 * 8 * 2


def _tiny_backend() -> SingleBackend:
    """A SingleBackend around a hand-made module: frozen 16x8 weight, trainable 4x8 + 4."""
    backend = SingleBackend(Config(), CPU)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    backend.model = model
    backend.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return backend


def test_model_state_bytes_before_the_optimizer_step() -> None:
    backend = _tiny_backend()
    trainable = 16 * 4 + 4
    for _ in range(2):
        backend.optimizer.zero_grad()
        backend.model(torch.randn(3, 8)).sum().backward()
        backend.optimizer.step()
    got = measure.model_state_bytes(backend)
    assert got == {
        "frozen_weights": 16 * 8 * 4,
        "trainable_params": 4 * trainable,
        "gradients": 4 * trainable,
        "optimizer_state": 2 * 4 * trainable + 2 * 4,
        "frozen_numel": 128,
        "trainable_numel": trainable,
    }
    backend.optimizer.zero_grad(set_to_none=True)
    assert measure.model_state_bytes(backend)["gradients"] == 0
    backend.release()
    assert backend.model is None and backend.optimizer is None


def test_snapshot_and_summary_line_single_process() -> None:
    snap = measure.snapshot(_tiny_backend())
    (row,) = snap["ranks"]
    assert row["frozen_weights"] == 512 and row["optimizer_state"] == 0
    assert row["rss_bytes"] > 0 and "cuda_max_allocated" not in row
    json.dumps(snap)
    assert "rank 0: frozen 0.00 MiB" in measure.summary_line(snap)


def _cfg(*overrides: str) -> Config:
    return config_lib.load(TINY, [f"data.path={REPO / 'dtrain/assets/tiny_corpus.txt'}", *overrides])


def test_mode_configs(tmp_path: Path) -> None:
    modes = measure_cli.mode_configs(_cfg("training.eval_every=5"), tmp_path, 3, with_8bit=True)
    assert list(modes)[:2] == ["full", "lora"]
    full, lora = modes["full"][0], modes["lora"][0]
    assert (full.mode, full.quantization.bits, lora.mode) == ("full", 16, "lora")
    assert full.training.max_steps == 3 and full.training.eval_every == 0
    assert full.output.dir == str(tmp_path / "runs" / "full")
    assert modes["lora_8bit"][0].quantization.bits == 8


def _row(frozen: int, trainable: int, acts: int) -> dict:
    opt = 2 * trainable
    return {
        "frozen_weights": frozen,
        "trainable_params": trainable,
        "gradients": trainable,
        "optimizer_state": opt,
        "activations": acts,
        "model_states": frozen + 2 * trainable + opt,
        "rss_peak_bytes": 400 << 20,
        "cuda_max_allocated": None,
    }


def test_report_files_and_flags(tmp_path: Path) -> None:
    cfg = _cfg("lora.targets=[q_proj,v_proj]", "training.micro_batch_size=4", "data.seq_len=32")
    full, lora = _row(0, 279168, 1 << 20), _row(279168, 7168, 1 << 20)
    lora["frozen_weights"] = 200000  # off by > 10% from the estimate: flagged
    measured = measure.Measured(0, 2, "cpu", {"full": [full, full], "lora": [lora, lora]})
    modes = {
        "full": {"label": "full FT", "mode": "full", "bits": 16},
        "lora": {"label": "LoRA", "mode": "lora", "bits": 16},
    }
    data = report.build(cfg, measured, modes, steps=2)
    paths = report.write(data, tmp_path)
    assert json.loads(paths["json"].read_text())["ranks"][1]["measured"]["lora"]["frozen_weights"] == 200000
    vs = data["ranks"][0]["vs_estimate"]
    assert vs["full"]["trainable_params"]["estimate"] == 279168 and not vs["full"]["trainable_params"]["flag"]
    assert vs["lora"]["frozen_weights"]["flag"] and not vs["lora"]["gradients"]["flag"]
    md = paths["md"].read_text()
    assert "## Rank 1" in md and "**!**" in md and "| full / LoRA |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_logs_memory_every_n_steps_and_at_the_end(tmp_path: Path) -> None:
    from dtrain.training.trainer import Trainer
    from tests.helpers import tiny_shapes

    cfg = _cfg(
        "lora.targets=[q_proj,v_proj]",
        "training.micro_batch_size=4",
        "data.seq_len=32",
        "training.max_steps=2",
        "training.memory_every=2",
        "training.eval_every=0",
        f"output.dir={tmp_path}",
    )
    trainer = Trainer(cfg)
    trainer.setup()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dtrain").addHandler(handler)
    try:
        assert trainer.train() == 0
    finally:
        logging.getLogger("dtrain").removeHandler(handler)
        trainer.cleanup()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "memory" not in rows[0]
    (mem,) = rows[1]["memory"]["ranks"]
    base, lora = tiny_shapes()
    assert mem["frozen_weights"] == 4 * sum(math.prod(s) for s in base)
    assert mem["trainable_params"] == 4 * sum(math.prod(s) for s in lora)
    assert mem["gradients"] == 0  # logged after step(), which zeroes them
    assert mem["optimizer_state"] == 2 * mem["trainable_params"] + 4 * len(lora)
    assert any("memory at end of run: rank 0: frozen 0.53 MiB" in r.getMessage() for r in records)
