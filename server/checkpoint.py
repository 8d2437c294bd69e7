"""The server's durable output: an atomic model checkpoint and a JSON-lines metrics log.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced,
then renamed over the old one, so a crash at any instant leaves either the previous
checkpoint or the new one, never half of one. Checkpoints are read back only from the
local disk, with ``weights_only=True``; nothing received from a peer is ever loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    folder: Path, state: Mapping[str, torch.Tensor], round_number: int, meta: Mapping[str, Any]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / CHECKPOINT_NAME
    temporary = folder / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    payload = {"round": round_number, "meta": dict(meta), "state_dict": dict(state)}
    with temporary.open("wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_dir(folder)
    return final


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """(round, meta, state_dict) of a checkpoint this project wrote on this machine."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return int(payload["round"]), dict(payload["meta"]), dict(payload["state_dict"])


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def _line(record: Mapping[str, Any]) -> str:
    # Strict JSON: a NaN would make the line unreadable to other tools. Uploads with a
    # non-finite report are refused, but the server's own numbers can still be infinite
    # (the test loss of a diverged model): those are written as null, never a crash.
    return json.dumps(_finite_or_null(record), sort_keys=True, allow_nan=False) + "\n"


class MetricsLog:
    """Append-only JSON lines, one record per round, flushed as each round ends."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / METRICS_NAME

    def append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(_line(record))
            handle.flush()
            os.fsync(handle.fileno())

    def truncate(self, last_round: int) -> None:
        """Keep only records of rounds <= ``last_round`` (rewritten atomically)."""
        kept = [r for r in self.read() if int(r.get("round", 0)) <= last_round]
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            handle.writelines(_line(record) for record in kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
