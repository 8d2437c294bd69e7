"""Clients SIGKILLed at random moments of a real federation, then restarted under the
same id: every round still ends once, the server exits cleanly, the model stays finite.

The fault model: a client machine can die at any instant (while starting, while
downloading, training or uploading) and come back as the same client. Moments are
drawn from a seeded ``random.Random``, relative to the victim's own log lines plus a
random delay, so a failing seed replays the same plan. At most one client is down at a
time, so at least two of the three stay live and ``--min-clients 2`` can always be met;
with ``--round-retries`` at least the number of kills, a round that loses its quorum
to a kill is retried, so the policy alone decides whether the run completes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Cluster, Proc
from tests.reliability.federation import (
    check_checkpoint_finite,
    check_history,
    sessions_created,
    start_client,
    start_reliability_server,
)

pytestmark = pytest.mark.e2e

ROUNDS = 6
KILLS = 3
CLIENT_IDS = ("c0", "c1", "c2")
# Lines a client logs at each stage of its life; a kill lands at or after one of them.
STARTUP = r"client \S+ on cpu"
MOMENTS = (
    STARTUP,  # a fresh client starting up and joining; an older one: right now
    r"round \d+: received global model",  # about to train
    r"round \d+: trained",  # about to upload
    r"round \d+: upload accepted",  # waiting for the next round's model
)


# Two local epochs make a round last longer than a client's restart, so the planned
# kills land while the run is still going.
CLIENT_FLAGS = ("--local-epochs", "2")


@dataclass(frozen=True)
class Kill:
    client_id: str
    moment: str
    delay_s: float


def _seeds(spec: str) -> list[int]:
    """The seeds named by a range ("1-3") or a list ("4,9,12")."""
    if "-" in spec:
        first, last = spec.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return [int(part) for part in spec.split(",") if part.strip()]


def _plan(seed: int) -> list[Kill]:
    rng = random.Random(seed)
    return [
        Kill(rng.choice(CLIENT_IDS), rng.choice(MOMENTS), round(rng.uniform(0.0, 1.0), 3))
        for _ in range(KILLS)
    ]


# More seeds for a soak run: RELIABILITY_SEEDS=1-50 pytest tests/reliability -k kills
SEEDS = _seeds(os.environ.get("RELIABILITY_SEEDS", "1-3"))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_client_kills_and_restarts_never_break_the_run(
    cluster: Cluster, tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "run"
    server, port = start_reliability_server(cluster, out, ROUNDS, 20, "--round-retries", str(KILLS))
    address = f"127.0.0.1:{port}"
    generation = dict.fromkeys(CLIENT_IDS, 0)
    live: dict[str, Proc] = {
        cid: start_client(cluster, f"{cid}-0", address, cid, *CLIENT_FLAGS) for cid in CLIENT_IDS
    }
    plan = _plan(seed)
    done: list[str] = []
    for kill in plan:
        victim = live[kill.client_id]
        try:
            start = 0 if kill.moment == STARTUP else max(0, len(victim.lines) - 1)
            victim.wait_for(kill.moment, timeout=90, start=start)
        except AssertionError:
            if _server_exited(server):
                break  # the run ended before this moment came round
            raise
        # Part of the fault model, not a wait for readiness: the kill lands a random
        # time after the moment.
        time.sleep(kill.delay_s)
        if server.process.poll() is not None:
            break
        victim.signal(signal.SIGKILL)
        victim.wait(timeout=30)
        done.append(f"{kill.client_id} at /{kill.moment}/ +{kill.delay_s}s")
        mark = len(server.lines)
        generation[kill.client_id] += 1
        name = f"{kill.client_id}-{generation[kill.client_id]}"
        live[kill.client_id] = start_client(cluster, name, address, kill.client_id, *CLIENT_FLAGS)
        # One client down at a time: the next kill waits until this one is back.
        try:
            server.wait_for(rf"client {kill.client_id} joined again", timeout=90, start=mark)
        except AssertionError:
            if _server_exited(server):
                break  # a restart that came after the last round has nothing to join
            raise

    assert server.wait(timeout=180) == 0, f"kills {done}\n{server.output()}"
    print(f"seed {seed}: {len(done)} kills landed: {done}")  # shown with pytest -s
    check_history(out, ROUNDS, min_clients=2)
    check_checkpoint_finite(out, ROUNDS)
    # A restarted client is the same client again, never a second one.
    assert sorted(sessions_created(server)) == sorted(CLIENT_IDS), done
    finished = [proc for proc in live.values() if "server finished the run" in proc.output()]
    assert len(finished) >= 2, done
    for proc in finished:
        assert proc.wait(timeout=60) == 0, proc.output()


def _server_exited(server: Proc) -> bool:
    """Whether a failed wait is explained by the server having finished (or exiting now)."""
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return True
