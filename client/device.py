"""Pick the device a client trains on and how many CPU threads it may use.

One client process owns one device: ``--gpu N`` pins it to ``cuda:N`` (a missing index is
an error at start, not a silent fall-back to the CPU); without ``--gpu`` it trains on the
CPU with ``torch.set_num_threads`` set to its share of the cores, so K clients on one
machine do not fight over the same cores.
"""

from __future__ import annotations

import os

import torch
from fedstream.common.errors import ConfigError


def select_device(gpu: int | None) -> torch.device:
    if gpu is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpu {gpu} was given but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise ConfigError(
            f"--gpu {gpu} does not exist: this machine has {count} GPU(s) (0..{count - 1})"
        )
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configure_threads(device: torch.device, num_threads: int | None) -> int:
    """Set torch's intra-op threads: the given share, else every usable core (CPU) or 1 (GPU)."""
    threads = num_threads or (usable_cores() if device.type == "cpu" else 1)
    torch.set_num_threads(threads)
    return threads
