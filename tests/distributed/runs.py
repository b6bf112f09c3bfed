"""Runs of dtrain as real processes that several test modules share: a backend kind's command,
start / finish / kill at a checkpoint, and the comparisons of two runs (tests/distributed)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dtrain.training import checkpoint
from tests.helpers import FAST, REPO, TINY, adapter, env_for_tests, launch_cmd, metrics

STEPS = 6
COMMON = [
    *FAST,
    f"training.max_steps={STEPS}",
    "training.save_every=1",
    "training.keep_last=3",
    "lora.dropout=0.1",
    "data.eval_fraction=0.95",
]
BACKENDS = {"single": ("none", 1), "fsdp": ("fsdp", 2), "zero3": ("deepspeed", 2), "zero3_tied": ("deepspeed", 2)}


def command(kind: str, out: Path, extra: list[str] = ()) -> list[str]:
    name, nproc = BACKENDS[kind]
    launcher = "python" if nproc == 1 else "torchrun"
    tie = ["model.arch.tie_word_embeddings=true"] if kind.endswith("_tied") else []
    return launch_cmd(nproc, launcher) + [
        "train",
        str(TINY),
        *COMMON,
        f"backend.name={name}",
        *tie,
        *extra,
        f"output.dir={out}",
    ]


def start(kind: str, out: Path, extra: list[str] = ()) -> subprocess.Popen:
    return spawn(command(kind, out, extra), out)


def spawn(cmd: list[str], out: Path) -> subprocess.Popen:
    """`cmd` in its own session (process group: torchrun and its workers are killed together),
    its output in `<out>.log` beside the output dir (where wait_for_checkpoint reads it)."""
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env_for_tests(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, out: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, (out.parent / f"{out.name}.log").read_text(errors="replace")


def run(kind: str, out: Path, extra: list[str] = ()) -> str:
    rc, log = finish(start(kind, out, extra), out)
    assert rc == 0, f"{kind} run exited {rc}\n{log[-4000:]}"
    return log


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    """Poll until checkpoint `step` is in place (renamed into place only once complete)."""
    target, deadline = checkpoint.checkpoint_dir(out, step), time.monotonic() + timeout
    while not target.is_dir():
        if proc.poll() is not None:
            raise AssertionError(
                f"run exited {proc.returncode} before checkpoint {step}\n"
                f"{(out.parent / f'{out.name}.log').read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no checkpoint {step} after {timeout} s")
        time.sleep(0.02)


def assert_same_run(a: Path, b: Path) -> None:
    """Same adapter, bit for bit, and the same metrics history (each step once, same losses)."""
    assert_same_adapter(a, b)
    losses = [[(r["step"], r["loss"]) for r in metrics(out) if "loss" in r] for out in (a, b)]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, STEPS + 1))


def assert_same_adapter(a: Path, b: Path) -> None:
    A, B = adapter(a), adapter(b)
    assert A.keys() == B.keys() and A
    for k in A:
        assert torch.equal(A[k], B[k]), f"{k}: max diff {(A[k] - B[k]).abs().max().item()}"
    assert any(A[k].abs().sum() > 0 for k in A if "lora_B" in k)


def _needs(kind: str) -> None:
    if kind == "zero3":
        pytest.importorskip("deepspeed")
        if not (REPO / "dtrain" / "backends" / "deepspeed.py").is_file():
            pytest.skip("dtrain/backends/deepspeed.py not there yet")


def kill_step(lowest: int, key: str) -> int:
    """A step in [lowest, STEPS - 2] drawn from a generator seeded by `key` (the same step on every
    run of one test, different steps across tests); DTRAIN_TEST_KILL_STEP=k forces a given one."""
    forced = os.environ.get("DTRAIN_TEST_KILL_STEP")
    return max(lowest, int(forced)) if forced else random.Random(key).randint(lowest, STEPS - 2)


def kill_after(kind: str, out: Path, k: int, extra: list[str] = ()) -> None:
    """Start a run, SIGKILL its whole process group once checkpoint `k` is in place."""
    proc = start(kind, out, extra)
    wait_for_checkpoint(proc, out, k)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before the kill"
    assert checkpoint.find_latest(out)[0] >= k


def workers(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's workers)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def probe(tmp_path, backend: str, overrides: list[str] = ()) -> list[dict]:
    """Per-rank storage after one step (tests/distributed/probe_backend.py under torchrun)."""
    cmd = launch_cmd(2, "torchrun")[:-2] + [
        str(REPO / "tests/distributed/probe_backend.py"),
        str(TINY),
        "lora.targets=[q_proj,v_proj]",
        f"backend.name={backend}",
        "training.micro_batch_size=2",
        f"output.dir={tmp_path}",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in range(2)]
