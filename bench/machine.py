"""Describe the machine a run happened on, for the README and the JSON."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies over all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over the next ``seconds``: other tenants make every figure low."""
    idle0, total0 = _cpu_times()
    time.sleep(seconds)
    idle1, total1 = _cpu_times()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def describe() -> dict[str, Any]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": round(memory, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
