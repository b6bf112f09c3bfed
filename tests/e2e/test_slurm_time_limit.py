"""A real one-node SLURM job whose `--time` (2 minutes) is shorter than its training: SLURM's
`--signal=B:USR1@20` reaches the batch shell, which forwards it to the ranks; every rank
checkpoints and exits 75, the script requeues the job, the requeued job resumes by itself
(training.resume=auto) and, after as many windows as it takes, ends with the adapter of an
uninterrupted job, bit for bit.

Timing: SLURM sends the signal up to one scheduler pass (30 s) before S seconds ahead of the
limit, so USR1 comes 70-100 s into a window; start-up takes 15-35 s here, so a window trains at
most ~88 s. The timed job plants `slow_step:1.0` (each step sleeps 1 s; the numbers are
unchanged, dtrain/faults.py): its 100 steps take more than 100 s on any machine, so it cannot end
in the first window, and the sleeping costs no CPU. The reference job trains without it.
Ondemand: 3.5-6.5 minutes on 2 cores at load 3.6-10 (two or three windows plus the reference)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.slurm_cluster import SlurmCluster
from tests.e2e.test_slurm_train import JOB_ENV, PY, REPO, TINY, _adapter, _log, _metrics

STEPS = 100
OVERRIDES = [
    "backend.name=fsdp",
    "lora.targets=[q_proj,v_proj]",
    f"training.max_steps={STEPS}",
    "training.warmup_steps=2",
    "training.micro_batch_size=4",
    "training.eval_every=0",
    "data.seq_len=32",
    "training.save_every=0",
    "logging.loss_curve=false",
]
SLOW = {"DTRAIN_TEST_FAULT": "slow_step:1.0"}


def _script(out: Path, script: Path, extra: list[str]) -> Path:
    args = [
        str(TINY),
        *OVERRIDES,
        f"output.dir={out}",
        "--tasks-per-node=2",
        "--cpus-per-task=1",
        f"--log={out.parent}/slurm-%j.out",
        f"--out={script}",
        *extra,
    ]
    r = subprocess.run([PY, "-m", "dtrain", "slurm", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return script


def _stops(log: str) -> list[str]:
    """The reason of every preemption stop in the job log ("SIGUSR1", "SLURM job end ...")."""
    return [line.split("preempted: ")[1] for line in log.splitlines() if "preempted: " in line]


@pytest.mark.ondemand
def test_job_hitting_its_time_limit_is_signalled_requeued_and_ends_exact(slurm: SlurmCluster, tmp_path: Path):
    t0 = time.monotonic()
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    job = slurm.sbatch(_script(ref, tmp_path / "ref.sbatch", []), env=JOB_ENV)
    assert slurm.wait(job, timeout=600) == "COMPLETED", _log(ref, job)[-4000:]
    t_ref = time.monotonic() - t0
    out = tmp_path / "timed" / "run"
    out.parent.mkdir()
    job = slurm.sbatch(
        _script(out, tmp_path / "timed.sbatch", ["--time=2", "--signal-seconds=20"]), env={**JOB_ENV, **SLOW}
    )
    state = slurm.wait(job, timeout=1200)
    info, log = slurm.job_info(job), _log(out, job)
    print(
        f"reference {t_ref:.0f} s, timed job {time.monotonic() - t0 - t_ref:.0f} s; restarts {info['Restarts']}; "
        f"stops: {[s[:100] for s in _stops(log)]}"
    )
    assert state == "COMPLETED", f"{state}: {info}\n{log[-6000:]}"
    assert int(info["Restarts"]) >= 1 and "requeueing job" in log, f"{info}\n{log[-6000:]}"
    # SLURM's time-limit signal, at the batch shell and forwarded, stopped the first window
    assert "batch shell got USR1" in log and "(SIGUSR1" in _stops(log)[0], log[-6000:]
    assert "resumed from" in log, log[-6000:]
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    got, want = _adapter(out), _adapter(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
