"""Nothing already written is lost: every command refuses to replace an earlier result unless asked.

Each refusal is one `dtrain: error:` line with exit code 2, and the earlier files are byte-identical
afterwards; the explicit overwrite really starts afresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.user_errors import assert_one_line, make_adapter, make_base, snapshot
from tests.helpers import TINY, metrics, run_dtrain, train


def _earlier_run(out: Path) -> dict[str, bytes]:
    """A run directory as an earlier `dtrain train` leaves it (contents need not be real)."""
    (out / "checkpoints" / "step-00000099" / "adapter").mkdir(parents=True)
    (out / "checkpoints" / "step-00000099" / "trainer_state.json").write_text('{"step": 99}')
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"old adapter")
    (out / "config.yaml").write_text("old: config\n")
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out / "notes.txt").write_text("the user's own file\n")
    return snapshot(out)


def test_train_refuses_an_earlier_run(tmp_path: Path) -> None:
    before = _earlier_run(tmp_path)
    proc = train(tmp_path, check=False)
    assert_one_line(
        proc,
        f"output.dir = '{tmp_path}' holds an earlier run",
        "training.resume=auto",
        "output.overwrite=true",
        "checkpoints",
        "metrics.jsonl",
    )
    assert snapshot(tmp_path) == before


def test_train_overwrite_starts_afresh(tmp_path: Path) -> None:
    _earlier_run(tmp_path)
    train(tmp_path, ["output.overwrite=true"])
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]  # no old rows appended to
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file\n"  # not dtrain's: kept
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_train_overwrite_and_resume_contradict(tmp_path: Path) -> None:
    before = _earlier_run(tmp_path)
    proc = train(tmp_path, ["output.overwrite=true", "training.resume=auto"], check=False)
    assert_one_line(proc, "output.overwrite = true and training.resume = auto")
    assert snapshot(tmp_path) == before


def test_train_output_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("x")
    assert_one_line(train(f, check=False), f"output.dir = '{f}': exists and is not a directory")
    assert_one_line(train(f / "sub", check=False), f"output.dir = '{f / 'sub'}': '{f}' is a file")
    assert f.read_text() == "x"


def test_train_output_dir_read_only(tmp_path: Path) -> None:
    """A parent directory dtrain cannot write into: a 0555 directory for a user; for root, who
    writes anywhere 0555 protects, /proc/sys (read-only even to root)."""
    if os.geteuid() == 0:
        ro = Path("/proc/sys")
        if not ro.is_dir() or os.access(ro, os.W_OK):
            pytest.skip("no directory here that root cannot write into")
        out = ro / "dtrain-test" / "run"
        assert_one_line(train(out, check=False), f"output.dir = '{out}': '{ro}' is not writable")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line(train(ro / "run", check=False), f"output.dir = '{ro / 'run'}': '{ro}' is not writable")
    finally:
        ro.chmod(0o755)


def test_merge_refuses_a_non_empty_out(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier merge")
    before = snapshot(out)
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    proc = run_dtrain(args, check=False)
    assert_one_line(proc, f"--out '{out}': directory is not empty; pass --overwrite")
    assert snapshot(out) == before
    run_dtrain([*args, "--overwrite"])
    assert (out / "config.json").is_file() and (out / "model.safetensors").read_bytes() != b"an earlier merge"
    assert not list(tmp_path.glob(".*merged*"))  # no staging or old copy left behind


def test_memory_refuses_an_earlier_report(tmp_path: Path) -> None:
    out = tmp_path / "memory"
    out.mkdir()
    (out / "memory_report.md").write_text("an earlier report\n")
    before = snapshot(out)
    proc = run_dtrain(["memory", str(TINY), f"output.dir={tmp_path}", "--out", str(out)], check=False)
    assert_one_line(proc, f"--out '{out}': holds an earlier report (memory_report.md); pass --overwrite")
    assert snapshot(out) == before
    f = tmp_path / "file"
    f.write_text("x")
    proc = run_dtrain(["memory", str(TINY), "--out", str(f)], check=False)
    assert_one_line(proc, f"--out '{f}': exists and is not a directory")


def test_slurm_refuses_an_existing_script(tmp_path: Path) -> None:
    out = tmp_path / "job.sbatch"
    out.write_text("#!/bin/bash\n# my edited script\n")
    args = ["slurm", str(TINY), "--out", str(out)]
    assert_one_line(run_dtrain(args, check=False), f"--out '{out}': file exists; pass --overwrite")
    assert out.read_text() == "#!/bin/bash\n# my edited script\n"
    assert_one_line(
        run_dtrain(["slurm", str(TINY), "--out", str(tmp_path)], check=False), f"--out '{tmp_path}': is a directory"
    )
    run_dtrain([*args, "--overwrite"])
    assert "srun" in out.read_text()
