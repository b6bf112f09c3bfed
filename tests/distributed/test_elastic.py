"""Elastic restarts: under `torchrun --max-restarts 1` with `training.resume=auto`, one rank
SIGKILLed after a checkpoint makes torchrun stop the other and start the group again; the new group
resumes from the newest complete checkpoint and finishes with the uninterrupted run's adapter, bit
for bit, and each step's loss once (FSDP2 and ZeRO-3, dropout on). Ondemand: 3 launches of 2 ranks
per backend.

The rendezvous is torchrun's c10d backend (`--rdzv-backend c10d --rdzv-endpoint HOST:PORT`): with
the static one (`--master_addr/--master_port`), torch 2.13's agent keeps its TCPStore across
restarts while the workers' env:// init adds no per-attempt prefix, so the restarted ranks read the
dead group's addresses and hang in init_process_group (seen here: both ranks waiting in
ProcessGroupGloo's constructor until the 30-minute timeout)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.distributed.runs import (_needs, assert_same_run, command, finish, kill_step, run, wait_for_checkpoint,
                                    workers)
from tests.helpers import REPO, env_for_tests


def _start_elastic(kind: str, out):
    import subprocess

    cmd = command(kind, out, ["training.resume=auto"])
    at = cmd.index("--master_addr")  # the c10d rendezvous: see the module docstring
    port = cmd[at + 3]
    cmd[at:at + 4] = ["--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env_for_tests(), stdout=log, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)


@pytest.mark.ondemand
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sigkilled_rank_under_max_restarts_resumes_and_ends_bit_exact(kind, tmp_path):
    _needs(kind)
    ref = tmp_path / "ref"
    run(kind, ref)
    out = tmp_path / "run"
    proc = _start_elastic(kind, out)
    k = kill_step(1, f"elastic-{kind}")
    wait_for_checkpoint(proc, out, k)
    ranks = workers(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun restarts the group
    rc, log = finish(proc, out, timeout=600)
    print(f"{kind}: SIGKILL of one rank after checkpoint {k}; torchrun exit {rc}")
    assert rc == 0, log[-4000:]
    assert "resumed from" in log and log.count("resume: no complete checkpoint") == 1, log[-4000:]
    assert_same_run(out, ref)
