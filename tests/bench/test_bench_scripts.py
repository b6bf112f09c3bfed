"""Every bench script works both ways: imported as `bench.<name>` (as tests do) and run as
`python bench/<name>.py` from another folder without PYTHONPATH (as bench/README.md says)."""

from __future__ import annotations

import importlib
import os
import subprocess

import pytest

from tests.helpers import PY, REPO

MODULES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")
SCRIPTS = [m for m in MODULES if 'if __name__ == "__main__":' in (REPO / "bench" / f"{m}.py").read_text()]


@pytest.mark.parametrize("name", MODULES)
def test_imports_as_a_module_of_the_bench_package(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__file__ == str(REPO / "bench" / f"{name}.py")


@pytest.mark.ondemand  # every bench script's --help in a subprocess (~25 s); imports are checked above
def test_each_script_runs_without_pythonpath(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    failed = {}
    assert len(SCRIPTS) >= 10 and "common" not in SCRIPTS  # the command lines, not the library modules
    for name in SCRIPTS:
        proc = subprocess.run(
            [PY, str(REPO / "bench" / f"{name}.py"), "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=300,
        )
        if proc.returncode != 0 or "usage:" not in proc.stdout:
            failed[name] = proc.stderr[-500:]
    assert failed == {}
