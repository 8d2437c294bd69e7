"""K worker processes that start each transfer together, and their aggregate throughput.

Workers print JSON events with ``t0``/``t1`` timestamps from ``time.monotonic()`` (one
system-wide clock on Linux, so times from different processes compare) and wait for a
``go`` line on stdin; the parent releases all of them at once. Aggregate throughput is
all bytes moved divided by the span from the first start to the last end, which is what
a round waits for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.procs import Child


@dataclass(frozen=True)
class Transfer:
    """Bytes moved by all workers in one direction and the wall time it took."""

    bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, events: Sequence[dict[str, Any]]) -> Transfer:
        start = min(float(e["t0"]) for e in events)
        end = max(float(e["t1"]) for e in events)
        return cls(sum(int(e["bytes"]) for e in events), end - start)


def collect(workers: Sequence[Child], kind: str, timeout_s: float) -> list[dict[str, Any]]:
    """The next ``kind`` event of every worker."""
    return [worker.event(kind, timeout_s) for worker in workers]


def release(workers: Sequence[Child]) -> None:
    for worker in workers:
        worker.send("go")
