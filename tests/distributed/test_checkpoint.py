"""Exact resume as real processes: SIGKILL at a random step then `training.resume=auto` ends with
the same A and B, bit for bit (fp32, CPU, dropout on), as an uninterrupted run, for the single
process, ZeRO-3 (2 ranks) and FSDP2 (2 ranks, after a SIGUSR1 preemption in the same test).
SIGUSR1/SIGTERM checkpoint at the next step boundary and exit 75; under torchrun, which reports
its own code, `<output.dir>/PREEMPTED` tells the job script.

Every run checkpoints each step (save_every=1) over 6 steps that cross an epoch (a 17-sequence
training split), so the kill lands mid-epoch or on an epoch boundary.
"""

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

from dtrain import checkpoint
from dtrain.trainer import PREEMPT_EXIT
from tests.helpers import FAST, REPO, TINY, adapter, env_for_tests, launch_cmd, metrics

STEPS = 6
COMMON = [*FAST, f"training.max_steps={STEPS}", "training.save_every=1", "training.keep_last=3",
          "lora.dropout=0.1", "data.eval_fraction=0.95"]
BACKENDS = {"single": ("none", 1), "fsdp": ("fsdp", 2), "zero3": ("deepspeed", 2), "zero3_tied": ("deepspeed", 2)}


def command(kind: str, out: Path, extra: list[str] = ()) -> list[str]:
    name, nproc = BACKENDS[kind]
    launcher = "python" if nproc == 1 else "torchrun"
    tie = ["model.arch.tie_word_embeddings=true"] if kind.endswith("_tied") else []
    return launch_cmd(nproc, launcher) + ["train", str(TINY), *COMMON, f"backend.name={name}", *tie,
                                          *extra, f"output.dir={out}"]


def start(kind: str, out: Path, extra: list[str] = ()) -> subprocess.Popen:
    """A run in its own session (process group): torchrun and its workers are killed together."""
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(command(kind, out, extra), cwd=REPO, env=env_for_tests(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)


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
            raise AssertionError(f"run exited {proc.returncode} before checkpoint {step}\n"
                                 f"{(out.parent / f'{out.name}.log').read_text(errors='replace')[-4000:]}")
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per backend, made on first use."""
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = tmp_path_factory.mktemp(f"ref-{kind}") / "run"
            run(kind, out)
            done[kind] = out
        return done[kind]

    return get


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


@pytest.mark.parametrize("kind", ["single", "zero3", "zero3_tied"])  # FSDP: in the SIGUSR1 test below
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(kind, reference, tmp_path):
    _needs(kind)
    ref = reference(kind)
    k = kill_step(1, kind)
    print(f"{kind}: SIGKILL after the checkpoint of step {k}")
    out = tmp_path / "run"
    kill_after(kind, out, k)
    log = run(kind, out, ["training.resume=auto"])
    assert "resumed from" in log
    assert_same_run(out, ref)


def _workers(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's workers)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_fsdp_sigusr1_then_sigkill_then_resume_is_bit_exact(reference, tmp_path):
    """FSDP, 2 ranks under torchrun. torchrun does not forward SIGUSR1 (it would die of it): the
    signal goes to the workers, as SLURM's --signal does. Each worker exits 75; torchrun itself
    exits 1 (ChildFailedError naming exitcode 75), so PREEMPTED in the output dir tells the job.
    The resumed run is then SIGKILLed at a random later step and resumed again (one launch fewer
    than two separate tests): the end is the uninterrupted run's adapter, bit for bit."""
    ref = reference("fsdp")
    out = tmp_path / "run"
    proc = start("fsdp", out)
    wait_for_checkpoint(proc, out, 1)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    for w in workers:
        os.kill(w, signal.SIGUSR1)
    rc, log = finish(proc, out)
    assert f"exitcode: {PREEMPT_EXIT})" in log and "preempted: checkpoint at step" in log, log[-4000:]
    assert rc == 1  # torchrun's own code; a direct launch (srun, python -m dtrain) exits 75
    marker = json.loads((out / checkpoint.PREEMPTED).read_text())
    assert 1 <= marker["step"] < STEPS and checkpoint.verify(Path(marker["checkpoint"])) is None
    assert not (out / "adapter").exists()
    preempted_at = marker["step"]
    if preempted_at + 1 <= STEPS - 2:
        k = kill_step(preempted_at + 1, f"fsdp-{preempted_at}")
        print(f"fsdp: preempted at step {preempted_at}, SIGKILL after the checkpoint of step {k}")
        kill_after("fsdp", out, k, ["training.resume=auto"])
        assert not (out / checkpoint.PREEMPTED).exists()  # removed by the resumed start
        assert f"resumed from {marker['checkpoint']}" in (out.parent / "run.log").read_text(errors="replace")
    log = run("fsdp", out, ["training.resume=auto"])
    assert "resumed from" in log
    assert_same_run(out, ref)


def test_sigterm_single_process_exits_75(tmp_path):
    """A direct launch (one process; srun starts ranks the same way) exits with 75 itself."""
    out = tmp_path / "run"
    proc = start("single", out)
    wait_for_checkpoint(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc, out)
    assert rc == PREEMPT_EXIT, log[-3000:]
    assert (out / checkpoint.PREEMPTED).is_file() and not (out / "adapter").exists()
    step = json.loads((out / checkpoint.PREEMPTED).read_text())["step"]
    assert step < STEPS  # before the last step: save_every wrote it, so mark_preempted ran
    # save_every=1 already wrote that step's checkpoint: the preemption only marks it
    assert log.count(f"checkpoint of step {step} written") == 1, log[-3000:]
    assert checkpoint.verify(checkpoint.checkpoint_dir(out, step)) is None
