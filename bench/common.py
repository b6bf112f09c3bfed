"""What every bench script shares: the machine and versions it records, medians and timing stats,
results files (markdown appended, JSON written), and child processes (launch, environment, logs)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "RESULTS.md"
PY = sys.executable


# ---- machine and versions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    cuda: bool
    name: str  # the GPU's name, else the CPU model
    text: str = ""  # one line for the results: count, name, RAM
    gpus: int = 0


def device_info() -> Device:
    import torch

    if torch.cuda.is_available():
        gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        text = f"{gpus} x {name}"
    else:
        gpus, name = 0, platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        text = f"CPU: {name}, {os.cpu_count()} logical cores"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        text += f", {int(mem) / 2**20:.0f} GiB RAM"
    return Device(cuda=gpus > 0, name=name, text=text, gpus=gpus)


def cuda_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "accelerate", "dtrain", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
        ).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def overloaded(load: str) -> bool:
    """The 1-minute load average (as `loadavg()` writes it) is above the core count."""
    with contextlib.suppress(ValueError, IndexError):
        return float(load.split()[0]) > (os.cpu_count() or 1)
    return False


# ---- timing --------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values)


def time_stats(times: list[float]) -> dict:
    """Median, min, p90 and count of a list of seconds."""
    s = sorted(times)
    return {
        "median_s": statistics.median(s),
        "min_s": s[0],
        "p90_s": s[min(len(s) - 1, int(0.9 * len(s)))],
        "n": len(s),
    }


# ---- results files -------------------------------------------------------------------------------
RESULTS_HEADER = """# dtrain benchmark results

Appended by `python bench/run.py` (newest last); how to run and what is counted: bench/README.md.
"""


def append_results(text: str, path: Path = RESULTS) -> None:
    """Append a markdown section to a results file (bench/RESULTS.md unless told), header first."""
    if not path.is_file():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as f:
        f.write("\n" + text + "\n")


def write_json(path: Path | str, obj) -> str:
    """Write `obj` as indented JSON; the text written."""
    text = json.dumps(obj, indent=1)
    Path(path).write_text(text)
    return text


# ---- child processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cuda: bool) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: 2 ranks on 2 cores
    return env


def torchrun(nproc: int, port: int | None = None) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
    ]


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


def run_logged(cmd: list[str], log: Path, env: dict, timeout: int) -> tuple[int, float]:
    """Run `cmd` with stdout+stderr into `log`; (exit code, wall seconds). 124 on timeout."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc = 124
    return rc, time.perf_counter() - t0


EXC_RE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^[\w.]*Error$|dtrain: error:|error: ")
SIGNS = ("terminate called", "Killed", "Signal ", "exitcode")


def read_log(log: Path) -> str:
    """A child's output file, undecodable bytes replaced; '' when it is not there."""
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def log_tail(log: Path, lines: int = 3) -> str:
    """The last `lines` non-blank lines of a child's output, joined by spaces."""
    return " ".join(read_log(log).strip().splitlines()[-lines:])


def error_line(log: Path) -> str:
    """The most telling line of a failed run's log: the last exception line, else an abort line."""
    if not log.is_file():
        return "no log"
    lines = [ln.strip() for ln in read_log(log).splitlines() if ln.strip()]
    lines = [ln for ln in lines if "Warning" not in ln and "ChildFailedError" not in ln]
    for ln in reversed(lines):
        if EXC_RE.search(ln):
            return ln[:300]
    for sign in SIGNS:
        for ln in lines:
            if sign in ln:
                return ln[:300]
    return lines[-1][:300] if lines else "empty log"


def finished(log: Path) -> bool:
    """dtrain logged the end of its run ('done: adapter in ...')."""
    return "INFO dtrain: done:" in read_log(log)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (dtrain's metrics.jsonl); [] when it is not there."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
