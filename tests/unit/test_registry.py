"""Membership rules on their own: credentials, rejoins, replaced streams."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from fedstream.client.credential import CredentialKeeper
from fedstream.common.errors import UploadRejected
from fedstream.server.credentials import Credential
from fedstream.server.registry import Registry, SessionState


def test_a_credential_admits_its_secret_only() -> None:
    credential, secret = Credential.issue()
    assert credential.admits(secret)
    assert not credential.admits(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert not credential.admits(None) and not credential.admits("")
    assert not credential.admits("x" * 10_000)
    assert secret.encode() not in credential.digest  # only the digest is kept


def test_a_rejoin_needs_the_credential_of_the_first_join() -> None:
    registry = Registry(max_clients=10, num_partitions=2)
    first = registry.join("a", None, None)
    assert first.secret is not None
    again = registry.join("a", None, first.secret)
    assert again.session is first.session and again.secret is None
    with pytest.raises(UploadRejected, match="'a' is taken") as caught:
        registry.join("a", None, "guessed")
    assert caught.value.reason == "unauthenticated"
    with pytest.raises(UploadRejected) as unknown:
        registry.verify("b", first.secret)
    assert unknown.value.reason == "unknown_client"


def test_the_ids_own_token_issues_a_new_credential_and_retires_the_old() -> None:
    registry = Registry(max_clients=10, num_partitions=2)
    old = registry.join("a", None, None).secret
    new = registry.join("a", None, None, owns_id=True).secret
    assert new is not None and new != old
    registry.verify("a", new)
    with pytest.raises(UploadRejected):
        registry.verify("a", old)


def test_only_the_live_stream_detaches_its_session() -> None:
    registry = Registry(max_clients=10, num_partitions=1)
    session = registry.join("a", None, None).session
    old, _ = registry.attach(session)
    new, _ = registry.attach(session)
    assert old.inbox.get_nowait().kind.value == "replaced"
    assert registry.detach(old) is False
    assert session.state is SessionState.ATTACHED and registry.attached() == ["a"]
    assert registry.detach(new) is True
    assert session.state is SessionState.IDLE and registry.attached() == []


def test_client_keeps_its_credential_for_its_server_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "alice.json"
    CredentialKeeper("server:1", path).store("s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CredentialKeeper("server:1", path).secret == "s3cret"
    assert CredentialKeeper("other:1", path).secret is None  # never shown to another server
    path.write_text("not json")
    assert CredentialKeeper("server:1", path).secret is None
