"""What the benchmarks ran on: results are only comparable on the same kind of machine.

The load average before and after the run is recorded as well: other work on a shared
machine moves absolute figures (ratios much less), and the record says how busy it was.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def describe() -> dict[str, Any]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "load_average_before": list(os.getloadavg()),
    }
