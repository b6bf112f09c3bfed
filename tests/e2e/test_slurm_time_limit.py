"""A real one-node SLURM job whose `--time` (3 minutes) is shorter than the training: SLURM's
--signal=USR1@S (or, if that comes late, dtrain's own deadline from SLURM_JOB_END_TIME / squeue)
makes every rank checkpoint and exit 75, the script requeues the job, the requeued job resumes by
itself (training.resume=auto) and, after as many windows as it takes, ends with the adapter of an
uninterrupted job, bit for bit. Ondemand: about 5-10 minutes on 2 cores. (A 1-minute limit was
tried: at load 12 the start-up alone took 70 s, so the job was killed before its first step.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.e2e.slurm_cluster import SlurmCluster
from tests.e2e.test_slurm_train import JOB_ENV, PY, REPO, TINY, _adapter, _log, _metrics

STEPS = 300
OVERRIDES = ["backend.name=fsdp", "lora.targets=[q_proj,v_proj]", f"training.max_steps={STEPS}",
             "training.warmup_steps=2", "training.micro_batch_size=4", "training.eval_every=0", "data.seq_len=32",
             "training.save_every=50", "logging.loss_curve=false"]


def _script(out: Path, script: Path, extra: list[str]) -> Path:
    args = [str(TINY), *OVERRIDES, f"output.dir={out}", "--tasks-per-node=2", "--cpus-per-task=1",
            f"--log={out.parent}/slurm-%j.out", f"--out={script}", *extra]
    r = subprocess.run([PY, "-m", "dtrain", "slurm", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return script


@pytest.mark.ondemand
def test_job_hitting_its_time_limit_is_signalled_requeued_and_ends_exact(slurm: SlurmCluster, tmp_path: Path):
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    job = slurm.sbatch(_script(ref, tmp_path / "ref.sbatch", []), env=JOB_ENV)
    assert slurm.wait(job, timeout=600) == "COMPLETED", _log(ref, job)[-4000:]
    out = tmp_path / "timed" / "run"
    out.parent.mkdir()
    job = slurm.sbatch(_script(out, tmp_path / "timed.sbatch", ["--time=3", "--signal-seconds=100"]), env=JOB_ENV)
    state = slurm.wait(job, timeout=900)
    info, log = slurm.job_info(job), _log(out, job)
    print(f"restarts {info['Restarts']}; stops: "
          f"{[line.split('preempted: ')[1][:90] for line in log.splitlines() if 'preempted: ' in line]}")
    assert state == "COMPLETED", f"{state}: {info}\n{log[-6000:]}"
    assert int(info["Restarts"]) >= 1 and "requeueing job" in log, f"{info}\n{log[-6000:]}"
    assert "preempted: checkpoint at step" in log and "resumed from" in log, log[-6000:]
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    got, want = _adapter(out), _adapter(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
