"""B6: do K clients on K shares of the machine finish a round in about one client's time?

A real ``fl-server`` (the small CNN on the bundled digits, evaluation off) and K real
``fl-client`` processes, each doing the same fixed work: ``--max-steps S`` steps of batch
32. Without a GPU the cores are divided among the clients (``--num-threads cores // K``);
with GPUs, one client per GPU. Each client reports its own training time (the train
start and end times it sends with its upload); the server logs the round's wall time.
Figures, for the last round (the first also pays one-off warm-up):

* round wall time / slowest client's training time (goal <= 1.15): what the round adds
  on top of the training it waits for;
* sum of the clients' training times / (K x round wall time): parallel efficiency.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.procs import Server, children
from benchmarks.results import BenchResult, Row

GOAL = 1.15
BATCH = 32


def placements(clients: int) -> list[list[str]]:
    """Device flags per client: one GPU each when there are enough, else a share of cores."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= clients:
        return [["--gpu", str(i)] for i in range(clients)]
    share = max(1, len(os.sched_getaffinity(0)) // clients)
    return [["--num-threads", str(share)] for _ in range(clients)]


def run_case(clients: int, steps: int, rounds: int, log_dir: Path) -> dict[str, float]:
    flags = [
        "--model", "cnn", "--dataset", "digits", "--no-evaluate", "--evaluate-every", "0",
        "--min-clients", str(clients), "--rounds", str(rounds), "--round-retries", "0",
        "--local-epochs", str(steps), "--batch-size", str(BATCH),
        "--round-timeout", "600", "--join-timeout", "300",
    ]
    with tempfile.TemporaryDirectory(prefix="fedstream-bench-") as out, children(log_dir) as group:
        server = Server(group, flags, {}, Path(out))
        placement = placements(clients)
        for i in range(clients):
            group.start(f"client{i}", [
                sys.executable, "-m", "fedstream.client", "--server", server.address,
                "--client-id", f"bench-{i}", "--max-steps", str(steps), *placement[i],
            ])
        records = server.finish(120.0 + 60.0 * rounds * clients)
    last = records[-1]
    trains = [c["train_finished_unix_s"] - c["train_started_unix_s"] for c in last["clients"]]
    wall = float(last["wall_time_s"])
    return {
        "round_wall_s": wall,
        "slowest_train_s": max(trains),
        "fastest_train_s": min(trains),
        "sum_train_s": sum(trains),
        "first_round_wall_s": float(records[0]["wall_time_s"]),
        "device": 0.0 if placement[0][0] == "--num-threads" else 1.0,
    }


def measure(clients: list[int], steps: int, rounds: int, log_dir: Path) -> BenchResult:
    result = BenchResult("B6", "parallel efficiency of K clients with equal work",
                         f"round wall <= {GOAL} x slowest client's training time")
    for k in clients:
        figures = run_case(k, steps, rounds, log_dir / f"b6-K{k}")
        wall, slowest = figures["round_wall_s"], figures["slowest_train_s"]
        overhead = wall / slowest if slowest > 0 else float("inf")
        result.rows.append(Row(
            config={"clients": k, "steps": steps, "batch": BATCH,
                    "placement": "gpu" if figures["device"] else "cpu-share"},
            value=wall,
            unit="s (round wall time)",
            limit=slowest,
            limit_unit="s (slowest client's training time)",
            ratio=overhead,
            goal=f"<= {GOAL}",
            met=overhead <= GOAL,
            extra={**figures,
                   "efficiency": figures["sum_train_s"] / (k * wall) if wall > 0 else 0.0},
        ))
    return result
