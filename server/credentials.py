"""Per-client credentials: what makes a client id belong to one client.

A token (``--token-file``) decides who may *enrol*; a shared join token (``* token``)
admits any id, so it cannot also be the proof of which client is which. The first Join
under an id therefore returns a fresh random secret, and every later call under that id
must present it in the ``fedstream-credential`` metadata (a restarted client keeps it in
its state file). The server keeps only a SHA-256 digest: the secret is 256 random bits,
so a plain hash is as strong as a slow password hash here, and a leaked registry gives
nobody a usable credential. Digests are compared in constant time; secrets are never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

SECRET_BYTES = 32
MAX_PRESENTED_CHARS = 256  # a longer value is refused unhashed (no work for junk)


@dataclass(frozen=True)
class Credential:
    """The digest the server keeps of one client's secret."""

    digest: bytes

    @classmethod
    def issue(cls) -> tuple[Credential, str]:
        """A new credential and the secret to hand to the client (once)."""
        secret = secrets.token_urlsafe(SECRET_BYTES)
        return cls(_digest(secret)), secret

    def admits(self, presented: str | None) -> bool:
        """True when ``presented`` is the secret this credential was issued with."""
        if presented is None or not presented or len(presented) > MAX_PRESENTED_CHARS:
            return False
        return hmac.compare_digest(self.digest, _digest(presented))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
