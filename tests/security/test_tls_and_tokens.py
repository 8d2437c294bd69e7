"""TLS, mutual TLS and token authentication with real fl-server / fl-client processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certs import CertificateAuthority
from tests.procs import Cluster, client_argv, read_metrics, start_fl_server

pytestmark = pytest.mark.e2e

ONE_ROUND = ("--rounds", "1", "--min-clients", "1", "--round-timeout", "60")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki")


def test_tls_federation_completes(cluster: Cluster, tmp_path: Path, ca: CertificateAuthority):
    server_pair = ca.issue("localhost", server=True)
    server, port = start_fl_server(
        cluster, tmp_path / "run", *ONE_ROUND,
        "--tls-cert", str(server_pair.cert), "--tls-key", str(server_pair.key),
    )  # fmt: skip
    client = cluster.start(
        "client",
        client_argv("--server", f"localhost:{port}", "--client-id", "tls-client",
                    "--tls-ca", str(ca.bundle)),
    )  # fmt: skip
    assert server.wait(timeout=120) == 0, server.output()
    assert client.wait(timeout=60) == 0, client.output()
    assert read_metrics(tmp_path / "run")[0]["succeeded"] == 1


def test_mutual_tls_refuses_a_client_without_certificate(
    cluster: Cluster, tmp_path: Path, ca: CertificateAuthority
):
    server_pair = ca.issue("localhost", server=True)
    client_pair = ca.issue("trusted-client", server=False)
    server, port = start_fl_server(
        cluster, tmp_path / "run", *ONE_ROUND,
        "--tls-cert", str(server_pair.cert), "--tls-key", str(server_pair.key),
        "--tls-client-ca", str(ca.bundle),
    )  # fmt: skip
    address = f"localhost:{port}"
    anonymous = cluster.start(
        "anonymous",
        client_argv("--server", address, "--client-id", "anonymous", "--tls-ca", str(ca.bundle),
                    "--connect-timeout", "3"),
    )  # fmt: skip
    assert anonymous.wait(timeout=60) == 1
    assert "unreachable" in anonymous.output()
    trusted = cluster.start(
        "trusted",
        client_argv("--server", address, "--client-id", "trusted", "--tls-ca", str(ca.bundle),
                    "--tls-cert", str(client_pair.cert), "--tls-key", str(client_pair.key)),
    )  # fmt: skip
    assert server.wait(timeout=120) == 0, server.output()
    assert trusted.wait(timeout=60) == 0, trusted.output()
    assert [c["client_id"] for c in read_metrics(tmp_path / "run")[0]["clients"]] == ["trusted"]


def test_tokens_admit_known_clients_and_refuse_others_without_logging_secrets(
    cluster: Cluster, tmp_path: Path
):
    good_secret, wrong_secret = "s3cret-token-for-alice", "guessed-token-by-mallory"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# client-id token\nalice {good_secret}\n")
    server, port = start_fl_server(
        cluster, tmp_path / "run", *ONE_ROUND, "--token-file", str(token_file)
    )
    address = f"127.0.0.1:{port}"
    mallory = cluster.start(
        "mallory",
        client_argv("--server", address, "--client-id", "alice", "--token", wrong_secret),
    )
    assert mallory.wait(timeout=60) == 1
    assert "UNAUTHENTICATED" in mallory.output()
    alice_token = tmp_path / "alice.token"
    alice_token.write_text(good_secret + "\n")
    alice = cluster.start(
        "alice",
        client_argv("--server", address, "--client-id", "alice", "--token-file", str(alice_token)),
    )
    assert server.wait(timeout=120) == 0, server.output()
    assert alice.wait(timeout=60) == 0, alice.output()
    log = server.output()
    assert "presented no valid token" in log
    assert good_secret not in log and wrong_secret not in log
    assert good_secret not in alice.output()


def test_shared_join_token_admits_any_client_id(cluster: Cluster, tmp_path: Path):
    token_file = tmp_path / "tokens"
    token_file.write_text("* shared-join-token\n")
    server, port = start_fl_server(
        cluster, tmp_path / "run", *ONE_ROUND, "--token-file", str(token_file)
    )
    client = cluster.start(
        "client",
        client_argv("--server", f"127.0.0.1:{port}", "--client-id", "anyone"),
        env={"FL_CLIENT_TOKEN": "shared-join-token"},
    )
    assert server.wait(timeout=120) == 0, server.output()
    assert client.wait(timeout=60) == 0, client.output()


def test_server_warns_when_listening_beyond_loopback_without_tls(cluster: Cluster, tmp_path: Path):
    from tests.procs import free_port, server_argv

    port = free_port()
    server = cluster.start(
        "server",
        server_argv("--host", "0.0.0.0", "--port", str(port), "--out", str(tmp_path / "run"),
                    *ONE_ROUND, "--join-timeout", "1"),
    )  # fmt: skip
    server.wait_for(r"listening on 0\.0\.0\.0 without TLS", timeout=120)


def test_tls_mistakes_are_named_not_reported_as_an_unreachable_server(
    cluster: Cluster, tmp_path: Path, ca: CertificateAuthority
):
    server_pair = ca.issue("localhost", server=True)
    client_pair = ca.issue("trusted-client", server=False)
    stranger = CertificateAuthority(tmp_path / "other-pki", "another CA")
    server, port = start_fl_server(
        cluster, tmp_path / "run", *ONE_ROUND,
        "--tls-cert", str(server_pair.cert), "--tls-key", str(server_pair.key),
        "--tls-client-ca", str(ca.bundle),
    )  # fmt: skip
    with_cert = ("--tls-cert", str(client_pair.cert), "--tls-key", str(client_pair.key))
    mistakes = {
        "name-mismatch": (
            ("--tls-ca", str(ca.bundle), "--tls-server-name", "wrong.example", *with_cert),
            r"certificate does not name 'wrong\.example'",
        ),
        "unknown-ca": (
            ("--tls-ca", str(stranger.bundle), *with_cert),
            r"not signed by a CA in --tls-ca",
        ),
        "no-client-cert": (("--tls-ca", str(ca.bundle)), r"may require a client certificate"),
        "plain": ((), r"may serve TLS only \(pass --tls-ca\)"),
    }
    clients = {
        name: cluster.start(
            name,
            # 127.0.0.1 (in the certificate too): "localhost" may try ::1 first, where
            # nothing listens, and a refused connection is not what this test is about.
            client_argv("--server", f"127.0.0.1:{port}", "--client-id", name,
                        "--connect-timeout", "3", "--backoff-initial-s", "0.2", *flags),
        )  # fmt: skip
        for name, (flags, _) in mistakes.items()
    }
    for name, (_, cause) in mistakes.items():
        client = clients[name]
        assert client.wait(timeout=60) == 1, client.output()
        client.wait_for(rf"retrying in .*{cause}|{cause}.*retrying in")  # each retry says why
        client.wait_for(rf"unreachable for .*giving up.*{cause}")
