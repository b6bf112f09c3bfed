"""Elastic restarts: under `torchrun --max-restarts 1` with `training.resume=auto`, one rank
SIGKILLed after a checkpoint makes torchrun stop the other and start the group again; the new group
resumes from the newest complete checkpoint and finishes with the uninterrupted run's adapter, bit
for bit, and each step's loss once (FSDP2 and ZeRO-3, dropout on). Ondemand: 3 launches of 2 ranks
per backend.

Both rendezvous kinds: the static one (`--master_addr/--master_port`) and c10d. torch 2.13's agent
keeps its store across restarts while the workers' env:// init adds no per-attempt prefix, so
without dtrain's prefix (backends/collectives.restart_store) the restarted ranks read the dead
group's gloo addresses: a hang in ProcessGroupGloo's constructor until the 30-minute timeout
(static), "Connection refused" (c10d)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.distributed.runs import (
    _needs,
    assert_same_run,
    command,
    finish,
    kill_step,
    run,
    spawn,
    wait_for_checkpoint,
    workers,
)


def _start_elastic(kind: str, out, rdzv: str):
    cmd = command(kind, out, ["training.resume=auto"])
    at = cmd.index("--master_addr")
    port = cmd[at + 3]
    if rdzv == "c10d":
        cmd[at : at + 4] = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    cmd[at:at] = ["--max-restarts", "1"]
    return spawn(cmd, out)


@pytest.mark.ondemand
@pytest.mark.parametrize("kind,rdzv", [("fsdp", "static"), ("zero3", "c10d"), ("zero3", "static")])
def test_sigkilled_rank_under_max_restarts_resumes_and_ends_bit_exact(kind, rdzv, tmp_path):
    _needs(kind)
    ref = tmp_path / "ref"
    run(kind, ref)
    out = tmp_path / "run"
    proc = _start_elastic(kind, out, rdzv)
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
