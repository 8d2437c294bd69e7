"""One real ``fl-server`` run driven by loadgen processes: the shared core of B4, B5 and B7.

The server runs a synthetic model of the requested size; ``clients`` simulated clients
are spread over a few loadgen processes. What comes back: the server's peak resident
memory (``VmHWM``), its resident memory once it was listening and idle, the server's own
round wall times (from its metrics log) and every simulated client's round timings.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import BenchError, Server, children, server_env, synthetic_server_flags


@dataclass(frozen=True)
class LoadRun:
    model_bytes: int
    clients: int
    rounds: int
    server_peak_bytes: int
    server_idle_bytes: int
    round_wall_s: list[float]
    # per round: (first RoundStart seen by a client, last upload accepted), monotonic clock
    client_span_s: list[float]


def run_load(
    model_bytes: int,
    clients: int,
    rounds: int,
    processes: int,
    log_dir: Path,
    tensor_bytes: int | None = None,
    timeout_s: float = 600.0,
) -> LoadRun:
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="fedstream-bench-") as out, children(log_dir) as group:
        server = Server(group, synthetic_server_flags(clients, rounds),
                        server_env(model_bytes, tensor_bytes), Path(out))
        idle = server.idle_rss_bytes
        loaders = [
            group.start(f"loadgen{i}", [sys.executable, "-m", "benchmarks.loadgen",
                                        "--server", server.address, "--clients", str(n),
                                        "--prefix", f"load{i}"])
            for i, n in enumerate(shares)
        ]
        records = server.finish(timeout_s)
        results = [loader.event("result", 120) for loader in loaders]
    sims = [c for r in results for c in r["clients"]]
    failed = [c for c in sims if c["error"]]
    if failed:
        raise BenchError(f"{len(failed)} simulated clients failed, e.g. {failed[0]['error']}")
    spans = []
    for number in range(1, rounds + 1):
        timings = [t for c in sims for t in c["rounds"] if t[0] == number]
        spans.append(max(t[3] for t in timings) - min(t[1] for t in timings) if timings else 0.0)
    return LoadRun(
        model_bytes=model_bytes,
        clients=clients,
        rounds=rounds,
        server_peak_bytes=server.memory.peak_bytes,
        server_idle_bytes=idle,
        round_wall_s=[float(r["wall_time_s"]) for r in records],
        client_span_s=spans,
    )
