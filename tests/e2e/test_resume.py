"""Server crash and resume: a SIGKILLed server continues from its last checkpoint.

Clients stay up across the crash and reconnect on their own (with TLS and tokens on,
where other systems are known to fail to reconnect).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fedstream.server.checkpoint import load_checkpoint

from tests.certs import CertificateAuthority
from tests.procs import Cluster, Proc, client_argv, read_metrics, start_fl_server

pytestmark = pytest.mark.e2e

ROUNDS = 4


def run_federation(
    cluster: Cluster,
    out: Path,
    kill_at: str | None,
    tag: str = "",
    server_flags: tuple[str, ...] = (),
    client_flags: Callable[[int], tuple[str, ...]] = lambda i: (),
    host: str = "127.0.0.1",
) -> list[Proc]:
    """Two clients, ROUNDS rounds; SIGKILL the server at the line ``kill_at`` and restart it.

    Returns the server processes (the first, and the restarted one if there was a kill)
    after checking that the last server and both clients exited 0.
    """
    flags = ("--rounds", str(ROUNDS), "--min-clients", "2", "--round-timeout", "60",
             "--log-level", "DEBUG", *server_flags)  # fmt: skip
    server, port = start_fl_server(cluster, out, *flags, name=f"server{tag}")
    clients = [
        cluster.start(
            f"client{tag}-{i}",
            client_argv("--server", f"{host}:{port}", "--client-id", f"c{i}",
                        "--partition-index", str(i), "--num-threads", "1",
                        "--backoff-initial-s", "0.2", "--backoff-max-s", "1", *client_flags(i)),
        )  # fmt: skip
        for i in range(2)
    ]
    procs = [server]
    if kill_at is not None:
        server.wait_for(kill_at, timeout=180)
        server.signal(signal.SIGKILL)
        server.wait(timeout=30)
        server, _ = start_fl_server(cluster, out, *flags, port=port, name=f"server{tag}-restarted")
        procs.append(server)
    assert server.wait(timeout=240) == 0, server.output()
    for client in clients:
        assert client.wait(timeout=60) == 0, client.output()
        if kill_at is not None:
            assert "connection lost" in client.output()
    return procs


def test_resume_after_sigkill_with_tls_and_tokens(cluster: Cluster, tmp_path: Path):
    ca = CertificateAuthority(tmp_path / "pki")
    pair = ca.issue("localhost", server=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("c0 token-zero\nc1 token-one\n")
    for i, secret in enumerate(("token-zero", "token-one")):
        (tmp_path / f"c{i}.token").write_text(secret)
    out = tmp_path / "run"
    procs = run_federation(
        cluster,
        out,
        kill_at=rf"round 2/{ROUNDS}",
        server_flags=("--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
                      "--token-file", str(tokens)),
        client_flags=lambda i: ("--tls-ca", str(ca.bundle),
                                "--token-file", str(tmp_path / f"c{i}.token")),
        host="localhost",
    )  # fmt: skip
    procs[-1].wait_for(r"resuming after round 2", timeout=5)
    history = read_metrics(out)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    for record in history:
        ids = [c["client_id"] for c in record["clients"]]
        assert sorted(ids) == ["c0", "c1"], record


KILL_POINTS = [
    r"round {r}: started",
    r"round {r}: client c\d uploaded",
    r"round {r}/\d+ ",
]


@pytest.mark.parametrize("seed", [1, 2])
def test_random_server_kill_loses_no_round_and_matches_a_clean_run(
    cluster: Cluster, tmp_path: Path, seed: int
):
    rng = random.Random(seed)
    # Any round but the last: a server killed after the final checkpoint has nothing left
    # to resume, and its clients would only find out by their connect timeout.
    kill_at = rng.choice(KILL_POINTS).format(r=rng.randint(1, ROUNDS - 1))
    crashed = tmp_path / "crashed"
    run_federation(cluster, crashed, kill_at, tag="-crash")
    clean = tmp_path / "clean"
    run_federation(cluster, clean, None, tag="-clean")

    history = read_metrics(crashed)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1)), kill_at
    round_crashed, _, state_crashed = load_checkpoint(crashed / "checkpoint.pt")
    round_clean, _, state_clean = load_checkpoint(clean / "checkpoint.pt")
    assert round_crashed == round_clean == ROUNDS
    # Training is seeded per (client, round) and a two-client sum does not depend on
    # arrival order, so the crashed run retrains any interrupted round bit for bit.
    for name, tensor in state_clean.items():
        torch.testing.assert_close(state_crashed[name], tensor, rtol=0, atol=0)
