"""dtrain under a real one-node SLURM: `dtrain slurm` renders the script, sbatch runs 2 CPU ranks.

test_slurm_train_two_tasks: trains to the end; adapter written, loss falls.
test_slurm_preemption_resumes_exactly: USR1 mid-training (what --signal=USR1@S does near the time
limit) -> checkpoint, exit 75, the script requeues the job, training resumes and ends with the same
adapter tensors as the uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
PY = sys.executable
STEPS = 40
OVERRIDES = [
    "backend.name=fsdp",
    "lora.targets=[q_proj,v_proj]",
    f"training.max_steps={STEPS}",
    "training.warmup_steps=2",
    "training.micro_batch_size=4",
    "training.eval_every=0",
    "data.seq_len=32",
]
JOB_ENV = {
    "DTRAIN_PYTHON": PY,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}


def _write_script(out: Path, script: Path) -> Path:
    """`dtrain slurm` writes the script."""
    args = [
        str(TINY),
        *OVERRIDES,
        f"output.dir={out}",
        "--tasks-per-node=2",
        "--cpus-per-task=1",
        "--signal-seconds=60",
        f"--log={out.parent}/slurm-%j.out",
        f"--out={script}",
    ]
    cmd = [PY, "-m", "dtrain", "slurm", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == script.resolve(), r.stdout
    return script


def _log(out: Path, job: str) -> str:
    p = out.parent / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else "(no job log)"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_preempt_exit_code_matches_trainer() -> None:
    from dtrain.cli import slurm
    from dtrain.training import trainer

    assert slurm.PREEMPT_EXIT == trainer.PREEMPT_EXIT


@pytest.fixture(scope="module")
def reference_run(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted 2-rank training job; (output dir, job id)."""
    base = tmp_path_factory.mktemp("slurm-train-ref")
    out = base / "run"
    job = slurm.sbatch(_write_script(out, base / "train.sbatch"), env=JOB_ENV)
    state = slurm.wait(job, timeout=240)
    assert state == "COMPLETED", f"{state}: {slurm.job_info(job)}\n{_log(out, job)[-4000:]}"
    return out, job


def test_slurm_train_two_tasks(slurm: SlurmCluster, reference_run: tuple[Path, str]) -> None:
    out, job = reference_run
    log = _log(out, job)
    assert "on 2 rank(s)" in log, log[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert slurm.job_info(job)["Restarts"] == "0"


def _wait_while_running(
    slurm: SlurmCluster, job: str, out: Path, timeout: float, what: str, done: Callable[[], bool]
) -> None:
    """Poll until `done()`; fail at once if the job left the queue, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done():
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"{slurm.job_info(job)}\n{_log(out, job)[-4000:]}"
        )
        assert time.monotonic() < deadline, f"{what}\n{_log(out, job)[-4000:]}"
        time.sleep(0.1)


def _signalled_job(
    slurm: SlurmCluster, tmp_path: Path, timeout: float, what: str, ready: Callable[[Path], bool]
) -> tuple[Path, str, dict, str]:
    """Submit the training job, send USR1 once `ready(out)`, wait for the end: (out, state, info, log)."""
    out = tmp_path / "run"
    job = slurm.sbatch(_write_script(out, tmp_path / "train.sbatch"), env=JOB_ENV)
    _wait_while_running(slurm, job, out, timeout, what, lambda: ready(out))
    slurm.signal(job, "USR1")  # the job steps' tasks: each rank, as --signal=USR1@S does
    state = slurm.wait(job, timeout=240)
    return out, state, slurm.job_info(job), _log(out, job)


def _trained_steps(out: Path, n: int) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= n


def test_slurm_preemption_resumes_exactly(slurm: SlurmCluster, reference_run: tuple[Path, str], tmp_path: Path) -> None:
    ref_out, _ = reference_run
    out, state, info, log = _signalled_job(slurm, tmp_path, 180, "no training progress", lambda o: _trained_steps(o, 3))
    assert state == "COMPLETED", f"{state}: {info}\n{log[-6000:]}"
    assert "preempted: checkpoint at step" in log, log[-6000:]
    assert "requeueing job" in log and info["Restarts"] == "1", f"{info}\n{log[-6000:]}"
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"resume must continue from the checkpoint: {steps}"
    got, want = _adapter(out), _adapter(ref_out)
    assert got.keys() == want.keys()
    diffs = {k: float((got[k] - want[k]).abs().max()) for k in want if not torch.equal(got[k], want[k])}
    assert not diffs, f"adapter differs from the uninterrupted run (max abs diff per tensor): {diffs}"


@pytest.mark.ondemand  # one more SLURM job; the preemption test above is in the default suite
def test_slurm_signal_during_setup_is_not_lost(
    slurm: SlurmCluster, reference_run: tuple[Path, str], tmp_path: Path
) -> None:
    ref_out, _ = reference_run
    # USR1 as soon as dtrain made its output dir: the ranks are still loading data / building the model
    out, state, info, log = _signalled_job(
        slurm, tmp_path, 120, "the training step never started", lambda o: o.is_dir()
    )
    assert state == "COMPLETED" and info["Restarts"] == "1", f"{state}: {info}\n{log[-6000:]}"
    assert "preempted: checkpoint at step 1 " in log, log[-6000:]  # taken during setup, acted on at step 1
    got, want = _adapter(out), _adapter(ref_out)
    assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys()
