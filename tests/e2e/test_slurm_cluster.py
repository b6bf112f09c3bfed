"""The SLURM harness itself, before any training: srun ranks, and requeue after a USR1 checkpoint exit."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from dtrain.cli.slurm import PREEMPT_EXIT, render_sbatch
from dtrain.errors import DtrainError
from tests.e2e.slurm_cluster import SlurmCluster

PY = sys.executable

# A stand-in for a training process: on the first run it waits for SIGUSR1, writes a marker and
# exits 75 (as dtrain does after its preemption checkpoint); on a restart it exits 0 at once.
FAKE_TRAINER = """\
import os, pathlib, signal, sys, time
work = pathlib.Path(sys.argv[1])
rank = os.environ["SLURM_PROCID"]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
(work / f"run{restart}.rank{rank}").write_text(" ".join(sys.argv[2:]))
if (work / "marker").exists():
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
(work / f"ready.{rank}").touch()
deadline = time.monotonic() + 100
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
if not got:
    sys.exit(3)
if rank == "0":
    (work / "marker").touch()
sys.exit(PREEMPT)
""".replace("PREEMPT", str(PREEMPT_EXIT))


def _wait_files(paths: list[Path], timeout: float, cluster: SlurmCluster, job: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"{paths} not written; job {cluster.job_info(job)}"
        time.sleep(0.1)


def test_sbatch_two_tasks(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "ranks.sbatch"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            #SBATCH --ntasks=2
            #SBATCH --output={tmp_path}/slurm-%j.out
            srun --ntasks=2 {PY} -c 'import os; print(os.environ["SLURM_PROCID"])' > {tmp_path}/ranks.txt
            """
        )
    )
    job = slurm.sbatch(script)
    state = slurm.wait(job, timeout=60)
    log = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    assert state == "COMPLETED", f"{state}: {slurm.job_info(job)}\n{log}"
    assert sorted((tmp_path / "ranks.txt").read_text().split()) == ["0", "1"]


def test_requeue_on_preemption_exit_code(slurm: SlurmCluster, tmp_path: Path) -> None:
    """USR1 to the job steps -> tasks exit 75 -> the script requeues itself -> second run exits 0."""
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    script = tmp_path / "preempt.sbatch"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            #SBATCH --ntasks=2
            #SBATCH --signal=USR1@60
            #SBATCH --requeue
            #SBATCH --open-mode=append
            #SBATCH --output={tmp_path}/slurm-%j.out
            trap 'echo batch shell got USR1' USR1
            echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
            srun --kill-on-bad-exit=0 {PY} {tmp_path}/fake_trainer.py {tmp_path}
            rc=$?
            echo "srun exited $rc"
            if [ $rc -eq {PREEMPT_EXIT} ]; then scontrol requeue $SLURM_JOB_ID; sleep 5; fi
            exit $rc
            """
        )
    )
    job = slurm.sbatch(script)
    _wait_files([tmp_path / "ready.0", tmp_path / "ready.1"], 60, slurm, job)
    t0 = time.monotonic()
    slurm.signal(job, "USR1")  # what --signal=USR1@60 does at the time limit: all job steps' tasks
    state = slurm.wait(job, timeout=60)
    requeue_s = time.monotonic() - t0
    info = slurm.job_info(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}: {info}\n{log}"
    assert info["Restarts"] == "1", info
    assert info["ExitCode"] == "0:0", info
    assert (tmp_path / "run1.rank0").exists() and (tmp_path / "run1.rank1").exists(), log
    assert "start restart=0" in log and "start restart=1" in log and f"srun exited {PREEMPT_EXIT}" in log
    # the requeue hold is cred_expire (5 s on this cluster) plus a scheduler pass
    assert requeue_s < slurm.requeue_delay_s + 20, requeue_s


def test_rendered_script_requeues_on_time_limit_signal(slurm: SlurmCluster, tmp_path: Path) -> None:
    """`dtrain slurm`'s script, with a stand-in trainer: --signal=B:USR1@S fires before --time ends,
    at the batch shell, which forwards it to srun's tasks (the stand-in exits 3 without it)."""
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    stub = tmp_path / "python-stub"  # the script runs "$DTRAIN_PYTHON" -m dtrain train CONFIG ...
    stub.write_text(f'#!/bin/bash\nexec {PY} {tmp_path}/fake_trainer.py {tmp_path} "$@"\n')
    stub.chmod(0o755)
    text = render_sbatch(
        "configs/tiny.yaml",
        nodes=1,
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        time="2",  # minutes; USR1 is due at 2 min - 110 s = 10 s (SLURM checks every ~30 s)
        signal_seconds=110,
        output=f"{tmp_path}/slurm-%j.out",
        overrides=["training.max_steps=3"],
    )
    script = tmp_path / "rendered.sbatch"
    script.write_text(text)
    job = slurm.sbatch(script, env={"DTRAIN_PYTHON": str(stub)})
    _wait_files([tmp_path / "ready.0", tmp_path / "ready.1"], 60, slurm, job)
    state = slurm.wait(job, timeout=100)
    info = slurm.job_info(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}: {info}\n{log}"
    assert info["Restarts"] == "1", info
    assert "requeueing job" in log, log
    assert "batch shell got USR1" in log and "forwarding it to the training processes" in log, log
    args = (tmp_path / "run1.rank1").read_text().split()
    assert args[:3] == ["-m", "dtrain", "train"] and "training.resume=auto" in args, args


def test_scancel_cancels_rather_than_requeues(slurm: SlurmCluster, tmp_path: Path) -> None:
    """A plain scancel sends TERM: dtrain checkpoints and exits 75, but the job must stay cancelled."""
    trainer = tmp_path / "python-stub"
    trainer.write_text(
        f"#!{PY}\n"
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(PREEMPT))\n"
        f"pathlib.Path('{tmp_path}', 'ready.' + os.environ['SLURM_PROCID']).touch()\n"
        "time.sleep(100)\n".replace("PREEMPT", str(PREEMPT_EXIT))
    )
    trainer.chmod(0o755)
    script = tmp_path / "rendered.sbatch"
    script.write_text(
        render_sbatch("configs/tiny.yaml", tasks_per_node=2, cpus_per_task=1, output=f"{tmp_path}/slurm-%j.out")
    )
    job = slurm.sbatch(script, env={"DTRAIN_PYTHON": str(trainer)})
    _wait_files([tmp_path / "ready.0", tmp_path / "ready.1"], 60, slurm, job)
    slurm.run(["scancel", job])
    state = slurm.wait(job, timeout=60)
    info = slurm.job_info(job)
    time.sleep(slurm.requeue_delay_s + 3)  # a wrongful requeue would show up by now
    info = slurm.job_info(job)
    assert state == "CANCELLED" and info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


def test_render_sbatch_options(tmp_path: Path) -> None:
    """No cluster needed: the rendered script's options, quoting, and bash syntax."""
    import subprocess

    gpu = render_sbatch(
        "cfg dir/x.yaml",
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        partition="gpu",
        time="04:00:00",
        signal_seconds=120,
        overrides=["lora.targets=[q_proj,v_proj]"],
        extra=["--account=proj"],
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --account=proj",
    ):
        assert line in gpu.splitlines(), line
    assert "'cfg dir/x.yaml'" in gpu and "'lora.targets=[q_proj,v_proj]'" in gpu
    assert "training.resume=auto" in gpu and f"-eq {PREEMPT_EXIT} ]" in gpu
    cpu = render_sbatch("c.yaml", overrides=["training.resume=never"])
    assert "--gres" not in cpu and "#SBATCH --ntasks-per-node=1" in cpu.splitlines()
    # the last argument line continues into the `&` that puts srun in the background
    assert "    training.resume=never \\" in cpu.splitlines() and "training.resume=auto" not in cpu
    assert "    &" in cpu.splitlines() and 'wait "$srun_pid"' in cpu
    for text in (gpu, cpu):
        (tmp_path / "s.sh").write_text(text)
        assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0
    for bad in (
        {"nodes": 0},
        {"gpus_per_node": 2, "tasks_per_node": 3},
        {"overrides": ["noequals"]},
        {"extra": ["account=x"]},
    ):
        try:
            render_sbatch("c.yaml", **bad)  # type: ignore[arg-type]
        except DtrainError:
            continue
        raise AssertionError(f"accepted {bad}")
