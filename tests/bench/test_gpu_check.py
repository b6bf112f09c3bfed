"""bench/gpu_check.py's CPU dry run: every command line, config and output path the GPU run uses
works (a lent GPU's minutes are not spent on a typo). Nothing timed is asserted."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.helpers import PY, REPO, env_for_tests

pytestmark = pytest.mark.slow


@pytest.mark.ondemand  # before a GPU run (bench/gpu_check.py), not on every change
def test_dry_run_of_the_training_checks(tmp_path):
    only = "llama1b_bf16,fsdp_ws1,zero3_ws1,int8,nf4"
    proc = subprocess.run(
        [PY, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path), "--only", only],
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert sorted(results) == sorted(only.split(","))
    for r in results.values():
        assert r["ok"], r
        assert len(r["numbers"]["losses"]) == 2 and all(math.isfinite(x) for x in r["numbers"]["losses"])
        assert r["numbers"]["memory_last"]  # training.memory_every=1 recorded the breakdown
    # one process, FSDP2 and ZeRO-3 on world size 1 train the same tiny model from the same weights
    first = {n: results[n]["numbers"]["losses"][0] for n in ("llama1b_bf16", "fsdp_ws1", "zero3_ws1")}
    assert max(first.values()) - min(first.values()) <= 1e-5 * first["llama1b_bf16"], first
    assert abs(results["int8"]["numbers"]["losses"][0] - first["llama1b_bf16"]) <= 0.01 * first["llama1b_bf16"]
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {n} | yes |" in summary for n in results)
