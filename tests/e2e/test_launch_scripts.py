"""The project's own launch scripts, run end to end with 2 CPU ranks (gloo)."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import FAST, PY, REPO, adapter, env_for_tests, free_port, losses


@pytest.mark.parametrize(
    "script,backend",
    [
        # the deepspeed launcher itself stays in the default suite (test_deepspeed)
        pytest.param("launch/deepspeed_1node.sh", "deepspeed", marks=pytest.mark.ondemand),
        ("launch/torchrun_1node.sh", "fsdp"),
    ],
)
def test_launch_script_trains_on_two_cpu_ranks(tmp_path, script, backend):
    env = env_for_tests(
        {
            "PYTHON": PY,
            "NPROC": "2",
            "MASTER_PORT": str(free_port()),
            "BACKEND": backend,
            "PATH": f"{REPO / '.venv' / 'bin'}:{env_for_tests()['PATH']}",
        }
    )
    env.pop("DS_ACCELERATOR")  # the script sets it on a node without nvidia-smi
    proc = subprocess.run(
        ["bash", script, *FAST, f"output.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(losses(tmp_path)) == 4
    assert len(adapter(tmp_path)) == 8
    assert "terminate called" not in proc.stderr
