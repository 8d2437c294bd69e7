"""Client authentication by token, and TLS credentials for the server.

Token file format, one entry per line (blank lines and ``#`` comments ignored)::

    client-a  3f9c...      # this token admits only the client id "client-a"
    *         71ab...      # a shared join token: admits any client id

Clients send ``authorization: Bearer <token>`` metadata on every call. Tokens are
compared with :func:`hmac.compare_digest` (constant time) and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

import grpc
from fedstream.common.errors import ConfigError

SHARED = "*"


class TokenTable:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = dict(tokens)

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        tokens: dict[str, str] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"{path}:{number}: expected 'client-id token'")
            client_id, token = parts
            if client_id in tokens:
                raise ConfigError(f"{path}:{number}: client id {client_id!r} listed twice")
            tokens[client_id] = token
        if not tokens:
            raise ConfigError(f"{path}: no tokens")
        return cls(tokens)

    def admits(self, client_id: str, token: str | None) -> bool:
        """True when ``token`` is this client's own token or the shared join token."""
        if token is None:
            return False
        presented = token.encode()
        expected = self._tokens.get(client_id)
        if expected is not None:
            return hmac.compare_digest(presented, expected.encode())
        shared = self._tokens.get(SHARED)
        return shared is not None and hmac.compare_digest(presented, shared.encode())

    def owns(self, client_id: str, token: str | None) -> bool:
        """True when ``token`` is ``client_id``'s own token (not the shared join token).

        Such a token proves the id by itself, so a client that lost its credential can
        enrol again with it; a shared token only enrols ids nobody holds yet.
        """
        expected = self._tokens.get(client_id)
        if token is None or expected is None or client_id == SHARED:
            return False
        return hmac.compare_digest(token.encode(), expected.encode())


def metadata_value(metadata: object, wanted: str) -> str | None:
    """The first text value of call metadata key ``wanted``, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == wanted and isinstance(value, str):
            return value
    return None


def bearer_token(metadata: object) -> str | None:
    """The token in ``authorization: Bearer <token>`` call metadata, if any."""
    value = metadata_value(metadata, "authorization")
    if value is not None and value.startswith("Bearer "):
        return value[len("Bearer ") :]
    return None


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca`` clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=None if client_ca is None else client_ca.read_bytes(),
        require_client_auth=client_ca is not None,
    )
