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
import signal
from pathlib import Path

import pytest

from dtrain.training import checkpoint
from dtrain.training.trainer import PREEMPT_EXIT
from tests.distributed.runs import (
    STEPS,
    _needs,
    assert_same_run,
    finish,
    kill_after,
    kill_step,
    run,
    start,
    wait_for_checkpoint,
    workers,
)


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


# One process in the default suite; FSDP2 in the SIGUSR1 test below (also a SIGKILL) and ZeRO-3
# (two DeepSpeed launches each) on request. Sharded checkpoint loading stays in the default suite
# through test_resume_world (an FSDP2 checkpoint resumed on ZeRO-3) and test_moe's resume.
@pytest.mark.parametrize(
    "kind",
    [
        "single",
        pytest.param("zero3", marks=pytest.mark.ondemand),
        pytest.param("zero3_tied", marks=pytest.mark.ondemand),
    ],
)
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


@pytest.mark.ondemand  # ~52 s; test_slurm_train's preemption resumes 2 ranks exactly by default
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
    ranks = workers(proc.pid)
    assert len(ranks) == 2
    for w in ranks:
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
