"""One client behind a fault-injecting proxy: cut, throttled and stalled connections.

The other clients talk to the server directly, so every fault hits one client's link
only, as when one site's network misbehaves. What must hold: a cut client reconnects
with backoff and rejoins under its own id (one session per client, never two); a slow
link still completes its rounds inside the deadline; a link that goes silent for
longer than the round timeout makes that client a failure of the round, which then
completes with the others. In every case the run ends and the server exits 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fedstream.common.codec import Manifest

from tests.faultproxy import FaultProxy
from tests.procs import Cluster, Proc, client_argv, free_port
from tests.reliability.federation import (
    check_checkpoint_finite,
    check_history,
    clients_of,
    sessions_created,
    start_client,
    start_reliability_server,
)

pytestmark = pytest.mark.e2e

THREE_CLIENTS = r"round (\d+): started with 3 clients"


def _federation(
    cluster: Cluster,
    out: Path,
    rounds: int,
    round_timeout_s: int,
    *client_flags: str,
    victim_first: bool = False,
) -> tuple[Proc, int, FaultProxy, Proc]:
    """Server, proxy, the proxied victim and two direct clients; ``victim_first`` waits
    for the victim to join before starting the others, so round 1 selects it."""
    server, port = start_reliability_server(cluster, out, rounds, round_timeout_s)
    proxy = FaultProxy("127.0.0.1", port).start()
    victim = start_client(cluster, "victim", proxy.address, "victim", *client_flags)
    if victim_first:
        server.wait_for(r"client victim joined", timeout=120)
    for i in range(2):
        start_client(cluster, f"c{i}", f"127.0.0.1:{port}", f"c{i}", *client_flags)
    return server, port, proxy, victim


def test_cut_connections_reconnect_under_the_same_id(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rounds = 12  # room for two cuts and two reconnects even on a loaded machine
    # A few local epochs make each round last longer than a reconnect, so the victim
    # is back in time for the rounds after each cut.
    server, _, proxy, victim = _federation(cluster, out, rounds, 30, "--local-epochs", "3")
    try:
        target = int(server.wait_for(THREE_CLIENTS, timeout=120)[1])
        assert target + 3 <= rounds, server.output()

        # Cut 1: while the victim trains, its round stream dies under it.
        victim.wait_for(rf"round {target}: received global model", timeout=60)
        assert proxy.cut() >= 1
        victim.wait_for(r"connection lost to server \S+: .*; retrying in", timeout=60)
        after_cut = len(victim.lines)
        rejoined = server.wait_for(r"client victim joined again", timeout=60)
        server_mark = server.lines.index(rejoined.string) + 1

        # Cut 2: armed as the next model arrives, it lands a third of the way into the
        # upload that follows (the model is ~0.6 MB each way).
        victim.wait_for(r"round \d+: received global model", timeout=60, start=after_cut)
        proxy.cut_after(200_000)
        victim.wait_for(
            r"upload failed \(\w+\), retrying|upload refused|connection lost|download refused",
            timeout=60,
            start=after_cut,
        )
        server.wait_for(r"client victim joined again", timeout=60, start=server_mark)

        assert server.wait(timeout=120) == 0, server.output()
    finally:
        proxy.close()
    history = check_history(out, rounds, min_clients=2)
    check_checkpoint_finite(out, rounds)
    # Reconnecting is joining again, never a second session for the same client.
    assert sorted(sessions_created(server)) == ["c0", "c1", "victim"]
    assert proxy.stats().accepted >= 3  # the first connection and one per cut
    # Back under its own id, the victim takes part again and is counted.
    assert any("victim" in clients_of(r) for r in history[target:]), history


def test_throttled_link_still_completes_rounds_in_time(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rounds = 1
    rate = 200_000  # bytes/s: ~3 s each way for the ~0.6 MB digits model
    server, _, proxy, _ = _federation(cluster, out, rounds, 30, victim_first=True)
    try:
        proxy.throttle(rate)
        assert server.wait(timeout=150) == 0, server.output()
        stats = proxy.stats()
    finally:
        proxy.close()
    history = check_history(out, rounds, min_clients=2)
    model_bytes = Manifest.of(check_checkpoint_finite(out, rounds)).total_bytes
    # The slow link carried every round's model both ways and was counted every round.
    for record in history:
        assert "victim" in clients_of(record), record
    assert stats.downstream_bytes >= rounds * model_bytes
    assert stats.upstream_bytes >= rounds * model_bytes


def test_stall_longer_than_the_round_timeout_is_a_failure(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rounds = 3
    round_timeout_s = 6
    server, _, proxy, _ = _federation(cluster, out, rounds, round_timeout_s, "--max-steps", "10")
    try:
        target = int(server.wait_for(THREE_CLIENTS, timeout=120)[1])
        assert target < rounds, server.output()
        # Silence while the round's model is in flight: bytes stop, sockets stay open.
        proxy.stall()
        try:
            server.wait_for(
                rf"round {target}: client victim missed the deadline",
                timeout=round_timeout_s + 60,
            )
        finally:
            proxy.resume()
        assert server.wait(timeout=120) == 0, server.output()
    finally:
        proxy.close()
    history = check_history(out, rounds, min_clients=2)
    stalled = history[target - 1]
    assert clients_of(stalled) == {"c0", "c1"}
    assert "no upload within" in stalled["failures"]["victim"]


def test_an_unreachable_server_is_retried_with_each_cause_logged(
    cluster: Cluster, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    client = cluster.start(
        "client",
        client_argv("--server", f"127.0.0.1:{port}", "--client-id", "early",
                    "--connect-timeout", "3", "--backoff-initial-s", "0.2",
                    "--backoff-max-s", "0.5"),
    )  # fmt: skip
    assert client.wait(timeout=60) == 1, client.output()
    retries = [line for line in client.output().splitlines() if "retrying in" in line]
    assert len(retries) >= 2, client.output()
    assert all("connection refused" in line for line in retries), retries
    client.wait_for(rf"127\.0\.0\.1:{port} unreachable for 3s; giving up")
