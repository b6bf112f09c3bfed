"""`dtrain env [--json] [--lock FILE ...] [--lock-kind cpu|cuda] [--check]`: what a bug report needs.

Prints the versions of Python and of the packages dtrain runs on (as installed, from their
metadata: nothing is imported for that), the devices (CUDA devices and names, or the CPU count),
the launcher's environment (RANK, WORLD_SIZE, ..., SLURM_* job variables), and whether the
installed versions match the lock setup.sh installs from: requirements/torch-cpu.txt +
requirements/cpu.txt on a machine without an NVIDIA GPU, requirements/cuda.txt with one (the same
rule as launch/setup.sh). --lock (repeatable) or DTRAIN_LOCK_FILES (paths separated by ':') compare
against other lock files; --check exits 1 when the versions differ from the lock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# (distribution name, shown as) in the order printed
PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "bitsandbytes",
    "gguf",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "numpy",
    "pyyaml",
    "pytest",
)
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "DS_ACCELERATOR",
)
SLURM_VARS = re.compile(
    r"SLURM_(JOB_\w+|JOBID|PROCID|LOCALID|NODEID|NTASKS\w*|NNODES|NODELIST|"
    r"STEP_\w+|CPUS_\w+|GPUS\w*|ARRAY_\w+|RESTART_COUNT|SUBMIT_DIR)$"
)
REPO = Path(__file__).resolve().parents[2]
NOT_INSTALLED = "not installed"


def add_parser(subparsers) -> None:
    """Register `dtrain env`."""
    p = subparsers.add_parser(
        "env", help="versions, devices and launcher environment (for bugs)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument(
        "--lock",
        action="append",
        default=None,
        metavar="FILE",
        help="compare with this lock file (repeatable; default: the repository's CPU or CUDA lock, by device)",
    )
    p.add_argument(
        "--lock-kind",
        choices=("cpu", "cuda"),
        default=None,
        help="which of the repository's locks to compare with (default: by device)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when versions differ from the lock")
    p.set_defaults(func=run)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. become -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def read_lock(path: str | Path) -> dict[str, str]:
    """{normalized name: version} of a requirements lock: `name==version` lines, with their
    `--hash` continuation lines and comments; an environment marker that does not hold here drops
    the line. Raises ValueError on a requirement that is not pinned with ==."""
    pins: dict[str, str] = {}
    text = Path(path).read_text().replace("\\\n", " ")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req, _, marker = line.partition(";")
        req = re.sub(r"\s--hash=\S+", "", " " + req).strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s=;]+)", req)
        if not m:
            raise ValueError(f"{path}: line {n} is not pinned with ==: {req!r}")
        if marker.strip():
            from packaging.markers import Marker

            if not Marker(marker.split("--hash", 1)[0].strip()).evaluate():
                continue
        pins[normalize(m.group(1))] = m.group(3)
    return pins


def has_nvidia_gpu() -> bool:
    """The rule launch/setup.sh picks its lock by: `nvidia-smi -L` lists a GPU."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.stdout.splitlines())


def default_locks(kind: str) -> list[Path]:
    req = REPO / "requirements"
    return [req / "torch-cpu.txt", req / "cpu.txt"] if kind == "cpu" else [req / "cuda.txt"]


def compare(lock_files: list[Path]) -> dict:
    """Installed versions against the lock: {'files', 'packages', 'differences': [...]}."""
    pins: dict[str, str] = {}
    for f in lock_files:
        pins.update(read_lock(f))
    diffs = []
    for name, want in sorted(pins.items()):
        have = installed_version(name)
        if have != want:
            diffs.append({"package": name, "installed": have or NOT_INSTALLED, "lock": want})
    return {"files": [str(f) for f in lock_files], "packages": len(pins), "differences": diffs}


def devices() -> dict:
    """CUDA devices as torch sees them, else the CPU count; torch is imported here only."""
    info: dict = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cuda": [],
    }
    if installed_version("torch") is None:
        info["torch"] = NOT_INSTALLED
        return info
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["cuda"].append(
                    {
                        "index": i,
                        "name": p.name,
                        "memory_gib": round(p.total_memory / 2**30, 1),
                        "capability": f"{p.major}.{p.minor}",
                    }
                )
    except Exception as e:  # a broken torch install is worth reporting, not a traceback
        info["torch_error"] = f"{type(e).__name__}: {e}"
    return info


def launcher_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in LAUNCHER_VARS if k in os.environ}
    env.update({k: v for k, v in sorted(os.environ.items()) if SLURM_VARS.match(k)})
    return env


def collect(args: argparse.Namespace) -> dict:
    from dtrain import __version__

    env_locks = os.environ.get("DTRAIN_LOCK_FILES")
    if args.lock:
        kind, files = "given", [Path(f) for f in args.lock]
    elif env_locks:
        kind, files = "DTRAIN_LOCK_FILES", [Path(f) for f in env_locks.split(os.pathsep) if f]
    else:
        kind = args.lock_kind or ("cuda" if has_nvidia_gpu() else "cpu")
        files = default_locks(kind)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        lock = {"kind": kind, "files": [str(f) for f in files], "error": f"lock file not found: {', '.join(missing)}"}
    else:
        try:
            lock = {"kind": kind, **compare(files)}
        except (OSError, ValueError) as e:
            lock = {"kind": kind, "files": [str(f) for f in files], "error": str(e)}
    return {
        "dtrain": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {p: installed_version(p) or NOT_INSTALLED for p in PACKAGES},
        "devices": devices(),
        "launcher": launcher_env(),
        "lock": lock,
    }


def format_text(info: dict) -> str:
    lines = [
        f"dtrain        {info['dtrain']}",
        f"python        {info['python']['version']} ({info['python']['executable']})",
        f"platform      {info['platform']}",
        "packages:",
    ]
    lines += [f"  {name:15} {version}" for name, version in info["packages"].items()]
    dev = info["devices"]
    lines.append("devices:")
    for d in dev["cuda"]:
        lines.append(f"  cuda:{d['index']}  {d['name']} ({d['memory_gib']} GiB, compute {d['capability']})")
    if not dev["cuda"]:
        why = (
            "torch not installed"
            if dev.get("torch") == NOT_INSTALLED
            else dev.get("torch_error") or f"torch CUDA {dev.get('torch_cuda') or 'none (CPU build)'}"
        )
        lines.append(f"  no CUDA device ({why})")
    lines.append(f"  CPUs: {dev['cpu_count']} ({dev['cpus_usable']} usable by this process)")
    lines.append("launcher:" + ("" if info["launcher"] else " no RANK/WORLD_SIZE/SLURM_* set"))
    lines += [f"  {k}={v}" for k, v in info["launcher"].items()]
    lock = info["lock"]
    lines.append(f"lock ({lock['kind']}): {' + '.join(lock['files'])}")
    if "error" in lock:
        lines.append(f"  cannot compare: {lock['error']}")
    elif not lock["differences"]:
        lines.append(f"  matches lock ({lock['packages']} packages)")
    else:
        lines.append(f"  differs from the lock in {len(lock['differences'])} of {lock['packages']} packages:")
        lines += [f"  {d['package']:24} installed {d['installed']}, lock {d['lock']}" for d in lock["differences"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect(args)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    lock = info["lock"]
    if args.check and ("error" in lock or lock["differences"]):
        return 1
    return 0
