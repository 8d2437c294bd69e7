"""B3: how fast the server turns a received delta into part of the running sum.

In one process: a delta of the given size is streamed into the server's real
``UploadReceiver`` (staged exactly as during a round, spilling to a temporary file past
the spool size), then timed through what the server does once the last byte is in:
``check_finite`` (decode and refuse NaN/Inf) and ``fold_into`` (decode and add into a
``DeltaAccumulator``). The limit is ``torch.Tensor.add_`` on in-memory tensors of the same
sizes, the least work a fold can do. Both are best of a few repeats, in bytes of delta
per second.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
from fedstream.common.codec import Manifest, iter_payload
from fedstream.server.aggregate import DeltaAccumulator
from fedstream.server.upload import UploadReceiver

from benchmarks.models import synthetic_state
from benchmarks.results import BenchResult, Row, ratio

GOAL = 0.5


def _best(action: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def measure(model_bytes: int, repeats: int = 3) -> BenchResult:
    result = BenchResult("B3", "fold-in rate of the accumulator (decode included)",
                         f">= {GOAL} x torch add_ bandwidth")
    delta = synthetic_state(model_bytes)
    manifest = Manifest.of(delta)
    size = manifest.total_bytes
    receiver = UploadReceiver(manifest)
    crc = 0
    for chunk in iter_payload(delta, manifest):
        crc = zlib.crc32(chunk, crc)
        receiver.add_chunk(chunk)
    receiver.finish(size, crc)
    accumulator = DeltaAccumulator(manifest)
    sums = {name: torch.zeros_like(t) for name, t in delta.items()}

    def add() -> None:
        for name, tensor in delta.items():
            sums[name].add_(tensor, alpha=3)

    try:
        add_s = _best(add, repeats)
        check_s = _best(receiver.check_finite, repeats)
        fold_s = _best(lambda: receiver.fold_into(accumulator, 3), repeats)
    finally:
        receiver.close()
    limit = size / add_s
    config = {"delta_bytes": size, "tensors": len(delta), "threads": torch.get_num_threads()}
    for what, seconds in (("validate + fold", check_s + fold_s), ("fold only", fold_s)):
        value = size / seconds
        result.rows.append(Row(
            config={**config, "path": what},
            value=value,
            unit="B/s",
            limit=limit,
            limit_unit="B/s (torch add_)",
            ratio=ratio(value, limit),
            goal=f">= {GOAL}",
            met=ratio(value, limit) >= GOAL,
            extra={"seconds": seconds, "check_finite_s": check_s, "fold_s": fold_s,
                   "add_s": add_s},
        ))
    return result
