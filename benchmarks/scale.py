"""B7: many concurrent clients with a tiny model on one server process.

N simulated clients (``benchmarks.loadgen``, spread over a few processes, one TCP
connection each) join one ``fl-server`` holding a model of about 100 k float32
parameters; every round all N download the model and upload a delta. Reported: the
server's own round wall time (from its metrics log; the first round is reported apart
from the later ones, which no longer include connection warm-up), the span the clients
saw, and the server's peak resident memory. Goal at N = 1000: a round under 5 s and
a peak under 1.5 GB.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.loadrun import run_load
from benchmarks.results import BenchResult, Row

GOAL_ROUND_S = 5.0
GOAL_RSS_BYTES = 1.5e9
GOAL_CLIENTS = 1000


def measure(model_bytes: int, clients: list[int], rounds: int, log_dir: Path) -> BenchResult:
    result = BenchResult("B7", "N concurrent clients, tiny model, one server process",
                         f"at N = {GOAL_CLIENTS}: round < {GOAL_ROUND_S:g} s, "
                         f"peak RSS < {GOAL_RSS_BYTES / 1e9:g} GB")
    for n in clients:
        run = run_load(model_bytes, n, rounds, max(1, min(4, n // 100)), log_dir / f"b7-N{n}")
        walls = run.round_wall_s
        later = walls[1:] or walls
        typical = statistics.median(later)
        judged = n == GOAL_CLIENTS
        result.rows.append(Row(
            config={"model_bytes": model_bytes, "clients": n, "rounds": rounds},
            value=typical,
            unit="s (median server round wall time, rounds 2..R)",
            goal=f"< {GOAL_ROUND_S:g} s and peak < 1.5 GB" if judged else "",
            met=(typical < GOAL_ROUND_S and run.server_peak_bytes < GOAL_RSS_BYTES)
            if judged else None,
            extra={
                "first_round_s": walls[0],
                "max_round_s": max(walls),
                "client_span_s": statistics.median(run.client_span_s[1:] or run.client_span_s),
                "server_peak_bytes": float(run.server_peak_bytes),
                "server_idle_bytes": float(run.server_idle_bytes),
            },
        ))
    return result
