"""The lock files, `launch/setup.sh --print-lock`, and `dtrain env` run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from dtrain.cli import env as env_cli
from tests.helpers import REPO, env_for_tests

REQ = REPO / "requirements"
LOCKS = {"cpu": [REQ / "torch-cpu.txt", REQ / "cpu.txt"], "cuda": [REQ / "cuda.txt"]}
KEY = (
    "torch",
    "deepspeed",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
    "gguf",
    "pytest",
)


def pins(kind: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in LOCKS[kind]:
        out.update(env_cli.read_lock(f))
    return out


def dtrain_env(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtrain", "env", *args],
        cwd=REPO,
        env=env_for_tests(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_lock_pins_every_package_exactly_with_hashes(kind):
    locked = pins(kind)  # read_lock raises on any requirement not pinned with ==
    for name in KEY:
        assert name in locked, f"{name} missing from the {kind} lock"
    assert locked["torch"].endswith("+cpu") == (kind == "cpu")
    if kind == "cuda":
        assert any(n.startswith("nvidia-") for n in locked), "CUDA lock without nvidia wheels"
    hashed = LOCKS[kind][-1]
    entries = hashed.read_text().replace("\\\n", " ").splitlines()
    for line in entries:
        if line and line[0].isalpha():
            assert "--hash=sha256:" in line, f"{hashed.name}: no hash on {line[:60]}"


def test_cpu_and_cuda_locks_agree_and_fit_pyproject():
    import tomllib

    cpu, cuda = pins("cpu"), pins("cuda")
    assert cpu["torch"].split("+")[0] == cuda["torch"]
    for name, version in cpu.items():
        if name != "torch" and name in cuda:
            assert cuda[name] == version, f"{name}: cpu {version}, cuda {cuda[name]}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    for r in map(Requirement, reqs):
        for kind, locked in (("cpu", cpu), ("cuda", cuda)):
            assert r.specifier.contains(locked[env_cli.normalize(r.name)], prereleases=True), (
                f"{kind} lock {r.name}=={locked[env_cli.normalize(r.name)]} outside {r}"
            )


def test_read_lock_rejects_a_range(tmp_path):
    f = tmp_path / "lock.txt"
    f.write_text("torch==2.13.0 \\\n    --hash=sha256:00\n    # via x\nnumpy>=2\n")
    with pytest.raises(ValueError, match="not pinned"):
        env_cli.read_lock(f)
    f.write_text("torch==2.13.0 \\\n    --hash=sha256:00\nfoo==1.0 ; python_version < '3'\n")
    assert env_cli.read_lock(f) == {"torch": "2.13.0"}  # a marker that does not hold here


def test_installed_key_packages_equal_the_lock():
    if os.environ.get("DTRAIN_UNLOCKED", "0") not in ("", "0"):
        pytest.skip("unlocked install (launch/check_latest.sh): versions may differ from the lock on purpose")
    locked = pins("cuda" if env_cli.has_nvidia_gpu() else "cpu")
    for name in KEY:
        assert installed(name) == locked[name], f"{name}: installed {installed(name)}, lock {locked[name]}"


def test_env_prints_each_package_with_its_installed_version():
    proc = dtrain_env()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    for name in env_cli.PACKAGES:
        row = [ln.split() for ln in lines if ln.split()[:1] == [name]]
        assert row, f"{name} not printed:\n{proc.stdout}"
        assert " ".join(row[0][1:]) == installed(name)
    assert f"python        {sys.version.split()[0]}" in proc.stdout
    assert "CPUs: " in proc.stdout and "launcher:" in proc.stdout
    info = json.loads(dtrain_env("--json").stdout)
    assert info["packages"] == {n: installed(n) for n in env_cli.PACKAGES}


def test_env_reports_launcher_variables():
    info = json.loads(
        dtrain_env(
            "--json", env={"WORLD_SIZE": "1", "MASTER_PORT": "29555", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0"}
        ).stdout
    )
    assert info["launcher"] == {
        "WORLD_SIZE": "1",
        "MASTER_PORT": "29555",
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "DS_ACCELERATOR": "cpu",
    }  # set by env_for_tests


def test_env_reports_differences_from_a_modified_lock(tmp_path):
    version = installed("transformers")
    files = []
    for f in LOCKS["cpu"]:
        text = f.read_text()
        if f.name == "cpu.txt":
            assert f"\ntransformers=={version} " in text
            text = "".join(
                "transformers==0.0.1 \\\n" if ln.startswith("transformers==") else ln
                for ln in text.splitlines(keepends=True)
            )
            text += "dtrain-no-such-package==1.0\n"
        (tmp_path / f.name).write_text(text)
        files.append(tmp_path / f.name)
    args = [a for f in files for a in ("--lock", str(f))]
    proc = dtrain_env(*args, "--check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines()]
    assert ["transformers", "installed", f"{version},", "lock", "0.0.1"] in rows, proc.stdout
    assert ["dtrain-no-such-package", "installed", "not", "installed,", "lock", "1.0"] in rows
    # the same lock through the environment variable, as JSON
    info = json.loads(dtrain_env("--json", env={"DTRAIN_LOCK_FILES": os.pathsep.join(map(str, files))}).stdout)
    diffs = {d["package"]: (d["installed"], d["lock"]) for d in info["lock"]["differences"]}
    assert diffs["transformers"] == (version, "0.0.1")
    assert diffs["dtrain-no-such-package"] == ("not installed", "1.0")


def test_env_matches_the_repository_lock():
    """This environment was installed from the lock (setup.sh), so `dtrain env` says it matches."""
    if os.environ.get("DTRAIN_UNLOCKED", "0") not in ("", "0"):
        pytest.skip("unlocked install (launch/check_latest.sh): versions may differ from the lock on purpose")
    proc = dtrain_env("--check")
    assert proc.returncode == 0, proc.stdout
    assert "matches lock" in proc.stdout


def test_env_without_a_lock_file_says_so(tmp_path):
    proc = dtrain_env("--lock", str(tmp_path / "missing.txt"), "--check")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot compare: lock file not found" in proc.stdout


def print_lock(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("DTRAIN_LOCK", "DTRAIN_UNLOCKED")}
    e.update(env or {})
    return subprocess.run(
        ["bash", "launch/setup.sh", "--print-lock", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=60
    )


def test_setup_picks_the_lock_by_gpu_and_honours_overrides():
    kind = "cuda" if env_cli.has_nvidia_gpu() else "cpu"
    files = " ".join(str(f.relative_to(REPO)) for f in LOCKS[kind])
    assert print_lock().stdout.strip() == f"locked {kind} {files}"
    assert print_lock(env={"DTRAIN_LOCK": "cuda"}).stdout.strip() == "locked cuda requirements/cuda.txt"
    assert (
        print_lock(env={"DTRAIN_LOCK": "cpu"}).stdout.strip()
        == "locked cpu requirements/torch-cpu.txt requirements/cpu.txt"
    )
    assert print_lock("--unlocked").stdout.strip() == f"unlocked {kind} pyproject.toml"
    assert print_lock(env={"DTRAIN_UNLOCKED": "1"}).stdout.strip() == f"unlocked {kind} pyproject.toml"
    assert print_lock(env={"DTRAIN_UNLOCKED": "0"}).stdout.startswith("locked ")
    assert print_lock(env={"DTRAIN_LOCK": "tpu"}).returncode == 2
    assert print_lock("--bogus").returncode == 2
