"""Checkpoint files, in process on the single backend: adapter-only bytes, the empty-tensor guard,
state (de)serialization without pickle, atomic writes, corruption detection, keep_last, and an
exact in-process resume (optimizer + scheduler + RNG, dropout on)."""

from __future__ import annotations

import json
import logging
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain import data as data_lib, lora
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend
from dtrain.config import schema as config_lib
from dtrain.data import BatchPlan
from dtrain.errors import ConfigError
from dtrain.lora import peft_format as adapter
from dtrain.storage import files
from dtrain.training import checkpoint, resume_check, state_tree
from dtrain.training.loss import token_loss

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"


def make_cfg(out: Path, *overrides: str) -> config_lib.Config:
    return config_lib.load(
        TINY,
        [
            f"data.path={CORPUS}",
            "lora.targets=[q_proj,v_proj]",
            "training.warmup_steps=2",
            "training.max_steps=6",
            f"output.dir={out}",
            *overrides,
        ],
    )


def make_backend(cfg: config_lib.Config) -> SingleBackend:
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    backend.setup_optimizer(cfg.training.max_steps)
    return backend


PLAN = data_lib.BatchPlan(n_examples=40, micro_batch=2, grad_accum=1, world=1, seed=0)
DATA = torch.randint(0, 512, (40, 16), generator=torch.Generator().manual_seed(0))


def train_step(backend: SingleBackend, step: int) -> None:
    """One optimizer step on the batch the plan gives for `step` (data position = f(step))."""
    ids = DATA[PLAN.indices(step, 0, 0)]
    total, n = token_loss(backend.forward({"input_ids": ids}), ids)
    backend.backward(total / n)
    backend.step()


def lora_state(backend: SingleBackend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backend.model.named_parameters() if lora.is_lora_param(n)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[config_lib.Config, SingleBackend]:
    cfg = make_cfg(tmp_path_factory.mktemp("run"))
    backend = make_backend(cfg)
    train_step(backend, 0)
    return cfg, backend


def test_adapter_file_is_lora_tensors_plus_a_small_header(trained, tmp_path):
    cfg, backend = trained
    out = tmp_path / "adapter"
    adapter.save_adapter(backend, cfg, out)
    f = out / adapter.ADAPTER_WEIGHTS
    raw = f.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    params = {n: p for n, p in backend.model.named_parameters() if lora.is_lora_param(n)}
    tensor_bytes = sum(p.numel() * p.element_size() for p in params.values())
    assert f.stat().st_size == 8 + header_len + tensor_bytes
    assert header_len < 16 * 1024
    assert set(header) - {"__metadata__"} == {lora.to_peft_key(n, "default") for n in params}
    trainable, _ = lora.count_parameters(backend.model)
    assert tensor_bytes == trainable * 4  # fp32 A and B, nothing else
    cfg_json = json.loads((out / adapter.ADAPTER_CONFIG).read_text())
    assert cfg_json["target_modules"] == ["q_proj", "v_proj"] and cfg_json["r"] == cfg.lora.r
    assert checkpoint.verify(out) is None  # published atomically, with checksums
    assert not list(tmp_path.glob(".tmp-*"))


class _EmptyShardBackend:
    """full_state returns a ZeRO-3 style placeholder: what a save without gathering would see."""

    rank, world_size = 0, 1

    def __init__(self, model):
        self.model = model

    def full_state(self, names):
        return {n: torch.empty(0) for n, _ in self.model.named_parameters() if names(n)}

    def barrier(self):
        pass

    def all_reduce_sum(self, t):
        return t


def test_an_empty_tensor_is_never_written(trained, tmp_path):
    cfg, backend = trained
    with pytest.raises(ValueError, match="empty"):
        files.write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2), "b": torch.empty(0)})
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="empty"):
        adapter.save_adapter(_EmptyShardBackend(backend.model), cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_state_round_trip_without_pickle(trained, tmp_path):
    _, backend = trained
    state = {
        "optimizer": backend.optimizer.state_dict(),
        "scheduler": backend.scheduler.state_dict(),
        "odd": {
            3: (1, 2.5, None),
            "__x__": [torch.empty(0, 4), torch.tensor(7.0)],
            "dt": torch.bfloat16,
            "inf": math.inf,
            "np": np.float32(1.5),
        },
    }
    tree, tensors = state_tree.flatten_state(state)
    files.write_tensors(tmp_path / "s.safetensors", tensors)
    files.write_json(tmp_path / "s.json", tree)
    back = state_tree.unflatten_state(
        json.loads((tmp_path / "s.json").read_text()), checkpoint.load_file(str(tmp_path / "s.safetensors"))
    )
    assert back["odd"][3] == (1, 2.5, None) and back["odd"]["dt"] is torch.bfloat16 and back["odd"]["inf"] == math.inf
    assert back["odd"]["__x__"][0].shape == (0, 4) and torch.equal(back["odd"]["__x__"][1], torch.tensor(7.0))
    assert back["scheduler"] == backend.scheduler.state_dict()
    for i, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(back["optimizer"]["state"][i][k], v)
    backend.optimizer.load_state_dict(back["optimizer"])  # loadable as it is
    with pytest.raises(TypeError, match="cannot store"):
        state_tree.flatten_state({"f": object()})


def test_rng_state_round_trip():
    plain, tensors = state_tree.rng_state()
    plain = json.loads(json.dumps(plain))
    first = (torch.rand(3), random.random(), np.random.rand())
    state_tree.set_rng_state(plain, tensors)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def _save_steps(cfg, backend, out: Path, steps: range) -> dict[int, dict[str, torch.Tensor]]:
    states = {}
    for step in steps:
        train_step(backend, step - 1)
        checkpoint.save_training(backend, cfg, out, step, PLAN)
        states[step] = lora_state(backend)
    return states


def test_corrupt_or_unmarked_checkpoints_are_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = make_cfg(out, "training.keep_last=5", "training.resume=auto")
    backend = make_backend(cfg)
    states = _save_steps(cfg, backend, out, range(1, 4))
    newest = checkpoint.checkpoint_dir(out, 3) / "adapter" / adapter.ADAPTER_WEIGHTS
    raw = bytearray(newest.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the tensor bytes
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="dtrain.training.checkpoint"):
        assert checkpoint.maybe_resume(backend, cfg, out) == 2
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step-00000003" in skipped[0] and "checksum" in skipped[0]
    assert all(torch.equal(lora_state(backend)[n], t) for n, t in states[2].items())
    (checkpoint.checkpoint_dir(out, 2) / files.MARKER).unlink()
    opt1 = checkpoint.checkpoint_dir(out, 1) / "optimizer.safetensors"
    assert checkpoint.maybe_resume(backend, cfg, out) == 1
    assert all(torch.equal(lora_state(backend)[n], t) for n, t in states[1].items())
    opt1.write_bytes(opt1.read_bytes()[:-7])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dtrain.training.checkpoint"):
        assert checkpoint.maybe_resume(backend, cfg, out) == 0
    assert "COMPLETE marker" in caplog.text and "truncated" in caplog.text


def test_layout_keep_last_and_leftovers(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, "training.keep_last=2")
    backend = make_backend(cfg)
    leftover = out / "checkpoints" / ".tmp-step-00000009"
    leftover.mkdir(parents=True)
    (leftover / "optim-rank0.json").write_text("{}")
    _save_steps(cfg, backend, out, range(1, 5))
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    ckpt = checkpoint.checkpoint_dir(out, 4)
    listed = json.loads((ckpt / files.MARKER).read_text())["files"]
    assert sorted(listed) == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-rank0.json",
        "rng-rank0.safetensors",
        "trainer_state.json",
    ]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and {k: state[k] for k in ("epoch", "step_in_epoch")} == PLAN.position(4)
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in backend.model.named_parameters() if not lora.is_lora_param(n)
    )
    assert sum(p.stat().st_size for p in ckpt.rglob("*")) < base_bytes / 4  # nothing of the base
    assert not any(ckpt.rglob("*.pt")) and not any(ckpt.rglob("*.bin"))


def test_resume_in_process_is_exact_with_dropout(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, "lora.dropout=0.1", "training.resume=auto")
    torch.manual_seed(1)
    ref = make_backend(cfg)
    for step in range(4):
        train_step(ref, step)
        if step + 1 == 2:
            checkpoint.save_training(ref, cfg, out, 2, PLAN)
    torch.manual_seed(99)  # a different RNG stream: the resume must restore the saved one
    resumed = make_backend(cfg)
    start = checkpoint.maybe_resume(resumed, cfg, out, PLAN)
    assert start == 2
    for step in range(start, 4):
        train_step(resumed, step)
    want, got = lora_state(ref), lora_state(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert resumed.scheduler.state_dict() == ref.scheduler.state_dict()


def test_resume_refuses_another_global_batch_but_not_another_world_size(trained, tmp_path):
    """Another world size with the same global batch (2 ranks x 2 after 1 x 4) is resumable; another
    global batch is refused in one line naming both products."""
    cfg, backend = trained
    state = checkpoint.trainer_state(cfg, backend, 3, PLAN)
    same = BatchPlan(PLAN.n_examples, PLAN.micro_batch // 2, PLAN.grad_accum, 2, PLAN.seed)
    resume_check.check(state, cfg, backend.model, same, tmp_path)
    other = BatchPlan(PLAN.n_examples, PLAN.micro_batch, PLAN.grad_accum, 2, PLAN.seed)
    with pytest.raises(
        ConfigError, match=f"global batch of {PLAN.global_batch} sequences .* this run's is {2 * PLAN.global_batch}"
    ):
        resume_check.check(state, cfg, backend.model, other, tmp_path)


def test_resume_trims_metrics_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 3, "loss": 0.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.trim_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
