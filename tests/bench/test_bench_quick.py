"""The benchmark's plumbing: `bench/run.py --quick` runs dtrain, the PEFT + accelerate baseline and
the latency part on a tiny model and reports each as ok (timings are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, env_for_tests


@pytest.mark.ondemand  # a benchmark run (~2 min): on request, like the benchmarks themselves
def test_quick_bench_runs_dtrain_peft_and_latency(tmp_path):
    results = tmp_path / "RESULTS.md"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--quick",
        "--only",
        "dtrain-ds,peft-ds,latency",
        "--record",
        "--results",
        str(results),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    for row in ("| dtrain-ds | ok |", "| peft-ds | ok |", "| merged |", "| unmerged |"):
        assert row in text, text
    assert "trainable / total params" in text and "131,072" not in text  # the quick model, not the cpu preset
    assert "| [ds] dtrain >= PEFT+accelerate tokens/s (goal 1.2x) | " in text
    assert text.count("4,096 / 151,872") == 2  # dtrain and PEFT count the same LoRA and total parameters
