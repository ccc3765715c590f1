"""What every bench prints and saves: the machine it ran on, and the results as JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine_facts(**versions: str) -> dict[str, Any]:
    """The machine (cores, CPU, load at start) plus the versions of what a bench measures."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor())
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": model,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **versions,
    }


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nJSON: {path}")
