"""B1 and B2: download and upload throughput of a real round, against a bare gRPC stream.

For every model size and K, two runs on this machine, one after the other:

* the limit: ``benchmarks.bare_grpc`` (one server process, K client processes) moves the
  same bytes per client in the same chunk size, download then upload;
* the figure: a real ``fl-server`` with a synthetic model of that size and K client
  processes running fedstream's client code (``benchmarks.transport_client``); download
  ends when the client holds the checked model, upload ends when the server has
  validated the delta and folded it into the round's sum.

Both are aggregate bytes per second over all K clients, from the first start to the
last end; all K clients start each direction together.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.barrier import Transfer, collect, release
from benchmarks.procs import Server, children, server_env, synthetic_server_flags
from benchmarks.results import BenchResult, Row, ratio

GOAL = 0.8


@dataclass(frozen=True)
class Case:
    model_bytes: int
    clients: int
    chunk_bytes: int
    rounds: int


@dataclass(frozen=True)
class CaseResult:
    case: Case
    bare_down: Transfer
    bare_up: Transfer
    down: Transfer  # best round
    up: Transfer  # best round
    round_wall_s: list[float]
    server_peak_bytes: int


def timeout_for(total_bytes: int) -> float:
    """Generous: 20 MB/s would be a failure worth reporting, not a hang."""
    return 120.0 + total_bytes / 20e6


def bare(case: Case, log_dir: Path) -> tuple[Transfer, Transfer]:
    timeout = timeout_for(case.model_bytes * case.clients)
    with children(log_dir) as group:
        server = group.start("bare-server", [sys.executable, "-m", "benchmarks.bare_grpc",
                                             "serve", "--chunk-bytes", str(case.chunk_bytes)])
        address = f"127.0.0.1:{server.event('listening', 60)['port']}"
        workers = [
            group.start(f"bare-client{i}", [sys.executable, "-m", "benchmarks.bare_grpc",
                                            "client", "--server", address,
                                            "--bytes", str(case.model_bytes),
                                            "--chunk-bytes", str(case.chunk_bytes)])
            for i in range(case.clients)
        ]
        collect(workers, "ready", 60)
        release(workers)
        down = Transfer.of(collect(workers, "downloaded", timeout))
        release(workers)
        up = Transfer.of(collect(workers, "uploaded", timeout))
    return down, up


def product(case: Case, log_dir: Path) -> tuple[list[Transfer], list[Transfer], list[float], int]:
    timeout = timeout_for(case.model_bytes * case.clients)
    downs, ups = [], []
    with tempfile.TemporaryDirectory(prefix="fedstream-bench-") as out, children(log_dir) as group:
        server = Server(group, synthetic_server_flags(case.clients, case.rounds),
                        server_env(case.model_bytes), Path(out))
        workers = [
            group.start(f"client{i}", [sys.executable, "-m", "benchmarks.transport_client",
                                       "--server", server.address, "--client-id", f"bench-{i}",
                                       "--chunk-bytes", str(case.chunk_bytes),
                                       "--model-bytes", str(case.model_bytes)])
            for i in range(case.clients)
        ]
        for _ in range(case.rounds):
            downs.append(Transfer.of(collect(workers, "downloaded", timeout)))
            release(workers)
            ups.append(Transfer.of(collect(workers, "uploaded", timeout)))
        records = server.finish(timeout)
        for worker in workers:
            worker.wait(60)
    walls = [float(r["wall_time_s"]) for r in records]
    return downs, ups, walls, server.memory.peak_bytes


def run_case(case: Case, log_dir: Path) -> CaseResult:
    name = f"{case.model_bytes >> 20}MiB-K{case.clients}"
    bare_down, bare_up = bare(case, log_dir / f"bare-{name}")
    downs, ups, walls, peak = product(case, log_dir / f"fedstream-{name}")
    return CaseResult(
        case,
        bare_down,
        bare_up,
        max(downs, key=lambda t: t.bytes_per_s),
        max(ups, key=lambda t: t.bytes_per_s),
        walls,
        peak,
    )


def _row(case: Case, figure: Transfer, limit: Transfer, wall: list[float]) -> Row:
    r = ratio(figure.bytes_per_s, limit.bytes_per_s)
    return Row(
        config={"model_bytes": case.model_bytes, "clients": case.clients,
                "chunk_bytes": case.chunk_bytes, "rounds": case.rounds},
        value=figure.bytes_per_s,
        unit="B/s",
        limit=limit.bytes_per_s,
        limit_unit="B/s (bare gRPC stream)",
        ratio=r,
        goal=f">= {GOAL}",
        met=r >= GOAL,
        extra={"seconds": figure.seconds, "limit_seconds": limit.seconds,
               "round_wall_s": min(wall) if wall else 0.0},
    )


def measure(cases: list[Case], log_dir: Path) -> tuple[BenchResult, BenchResult]:
    b1 = BenchResult("B1", "download throughput, server -> K clients", f">= {GOAL} x bare gRPC")
    b2 = BenchResult("B2", "upload throughput, K clients -> server, fold-in included",
                     f">= {GOAL} x bare gRPC")
    for case in cases:
        result = run_case(case, log_dir)
        b1.rows.append(_row(case, result.down, result.bare_down, result.round_wall_s))
        b2.rows.append(_row(case, result.up, result.bare_up, result.round_wall_s))
        b1.rows[-1].extra["server_peak_bytes"] = float(result.server_peak_bytes)
    return b1, b2
