"""Rank, world and local rank from the launcher's environment variables (no processes)."""

from __future__ import annotations

import os

import pytest
import torch

from dtrain.backends import env as dist
from dtrain.storage import files

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def env(monkeypatch):
    for key in LAUNCHER_VARS:
        # setenv first so that monkeypatch restores the key even when it was unset (detect() sets some)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a GPU host
    return monkeypatch


def test_torchrun_style(env):
    env.setenv("RANK", "3"), env.setenv("WORLD_SIZE", "4"), env.setenv("LOCAL_RANK", "1")
    e = dist.detect("cpu", "gloo")
    assert (e.rank, e.world_size, e.local_rank, e.device.type, e.dist_backend) == (3, 4, 1, "cpu", "gloo")


def test_local_rank_from_ranks_per_node_when_the_launcher_sets_only_rank(env):
    env.setenv("RANK", "5"), env.setenv("WORLD_SIZE", "8"), env.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.detect("cpu", "gloo").local_rank == 1  # second node, second rank


def test_local_rank_is_the_rank_when_nothing_says_how_many_per_node(env):
    env.setenv("RANK", "1"), env.setenv("WORLD_SIZE", "2")
    assert dist.detect("cpu", "gloo").local_rank == 1
    assert os.environ["LOCAL_RANK"] == "1"  # set for DeepSpeed's engine, which reads it


def test_local_rank_from_the_gpus_of_the_node(env):
    env.setenv("RANK", "9"), env.setenv("WORLD_SIZE", "16")
    env.setattr(torch.cuda, "is_available", lambda: True)
    env.setattr(torch.cuda, "device_count", lambda: 8)
    assert dist._local_rank(9) == 1


def test_srun_started_ranks(env):
    env.setenv("SLURM_PROCID", "3"), env.setenv("SLURM_NTASKS", "4"), env.setenv("SLURM_LOCALID", "1")
    env.setenv("MASTER_ADDR", "node7")
    e = dist.detect("cpu", "gloo")
    assert (e.rank, e.world_size, e.local_rank) == (3, 4, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")


def test_no_launcher_is_one_process(env):
    e = dist.detect("cpu", "auto")
    assert (e.rank, e.world_size, e.local_rank, e.dist_backend) == (0, 1, 0, "gloo")


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    files.write_text_atomic(path, "new: 1\n")
    assert path.read_text() == "new: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
