"""This process's memory: resident set size and its peak (Linux /proc), CUDA allocator counters.

No dtrain imports: the backends' heap trimming and the memory profiler both read it.
"""

from __future__ import annotations

import math
import os
import resource

import torch


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM in bytes from /proc/self/status (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def process_memory(device: torch.device) -> dict[str, float]:
    """RSS now and its peak, and on CUDA allocated / peak allocated / peak reserved bytes."""
    status = _proc_status()
    rss = status.get("VmRSS")
    if rss is None:
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except ImportError:
            rss = math.nan
    peak = status.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {
        "rss_bytes": rss,
        "rss_peak_bytes": peak,
        "cuda_allocated": math.nan,
        "cuda_max_allocated": math.nan,
        "cuda_max_reserved": math.nan,
    }
    if device.type == "cuda":
        out.update(
            cuda_allocated=torch.cuda.memory_allocated(device),
            cuda_max_allocated=torch.cuda.max_memory_allocated(device),
            cuda_max_reserved=torch.cuda.max_memory_reserved(device),
        )
    return out


def reset_peaks(device: torch.device) -> None:
    """Restart the peak counters: CUDA's, and the RSS high-water mark where Linux allows it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
