"""Steps every reliability test repeats: start clients, read back what the server
recorded, and check the invariants a run must keep whatever faults it met.

The invariants: every round ends exactly once (a round is in metrics.jsonl once, in
order), a client is never counted twice in a round, and the global model in the
checkpoint is finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from fedstream.server.checkpoint import load_checkpoint

from tests.procs import Cluster, Proc, client_argv, start_fl_server

# Per-round server lines ("round N: started with K clients", "client X uploaded") are
# logged at DEBUG; the tests wait on them.
SERVER_FLAGS = ("--log-level", "DEBUG", "--join-timeout", "60")

# Reconnect quickly, and give up within a minute rather than wait out the 600 s default
# when a test has already torn the server down.
CLIENT_FLAGS = (
    "--num-threads",
    "1",
    "--backoff-initial-s",
    "0.2",
    "--backoff-max-s",
    "2",
    "--connect-timeout",
    "60",
)


def start_client(
    cluster: Cluster,
    name: str,
    server: str,
    client_id: str,
    *flags: str,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Proc:
    """A real fl-client process; ``prefix`` wraps it (``ip netns exec NS``, for one)."""
    argv = [*prefix, *client_argv("--server", server, "--client-id", client_id, *CLIENT_FLAGS)]
    return cluster.start(name, [*argv, *flags], env)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    with (out / "metrics.jsonl").open() as handle:
        return [json.loads(line) for line in handle]


def check_history(out: Path, rounds: int, min_clients: int) -> list[dict[str, Any]]:
    """Every round recorded exactly once, in order, each counted from distinct clients."""
    history = read_metrics(out)
    assert [record["round"] for record in history] == list(range(1, rounds + 1)), history
    for record in history:
        ids = [client["client_id"] for client in record["clients"]]
        assert len(ids) == len(set(ids)), f"round {record['round']} counted a client twice: {ids}"
        assert record["succeeded"] == len(ids) >= min_clients, record
        assert not set(ids) & set(record["failures"]), record
    return history


def check_checkpoint_finite(out: Path, rounds: int) -> dict[str, torch.Tensor]:
    round_number, _, state = load_checkpoint(out / "checkpoint.pt")
    state = {name: torch.as_tensor(tensor) for name, tensor in state.items()}
    assert round_number == rounds
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"checkpoint tensor {name} is not finite"
    return state


def clients_of(record: dict[str, Any]) -> set[str]:
    return {client["client_id"] for client in record["clients"]}


def sessions_created(server: Proc) -> list[str]:
    """Client ids the server opened a new session for ("joined", not "joined again")."""
    return [
        line.split("client ", 1)[1].split(" joined", 1)[0]
        for line in server.lines
        if " joined (partition " in line
    ]


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def start_reliability_server(
    cluster: Cluster, out: Path, rounds: int, round_timeout_s: float, *extra: str
) -> tuple[Proc, int]:
    """fl-server on loopback with the flags every reliability run shares (quorum of 2)."""
    return start_fl_server(
        cluster, out, "--rounds", str(rounds), "--min-clients", "2",
        "--round-timeout", str(round_timeout_s), *extra, *SERVER_FLAGS,
    )  # fmt: skip
