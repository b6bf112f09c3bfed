"""`backend.timeout_s` reaches the process group: with 2 ranks and rank 1 away for 12 s, rank 0's
collective fails after the configured 3 s (gloo: "Timed out waiting 3000ms"), not when rank 1
comes back or exits, for FSDP2's `init_process_group` and DeepSpeed's `init_distributed` alike.
"""

from __future__ import annotations

import json

import pytest

from dtrain.config.schema import Config
from tests.helpers import PY, REPO, TINY, env_for_tests, free_port

TIMEOUT_S, AWAY_S = 3, 12


def test_default_timeout_is_30_minutes():
    assert Config().backend.timeout_s == 1800


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.ondemand)])
def test_a_collective_fails_after_backend_timeout_s(name):
    import subprocess

    if name == "deepspeed":
        pytest.importorskip("deepspeed")
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "distributed" / "probe_timeout.py"),
        str(AWAY_S),
        str(TINY),
        f"backend.name={name}",
        f"backend.timeout_s={TIMEOUT_S}",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env_for_tests({"PYTHONPATH": str(REPO)}),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=180,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[0].removeprefix("PROBE "))
    assert result["error"] and f"Timed out waiting {TIMEOUT_S * 1000}ms" in result["error"], result
    assert TIMEOUT_S - 0.5 <= result["waited_s"] < AWAY_S - 2, result
