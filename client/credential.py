"""The credential this client's first Join returned, kept so a restarted client keeps its id.

The server issues a secret at the first Join under a client id and refuses later calls
under that id without it (fedstream.server.credentials). A client started with
``--client-id`` keeps the secret in ``<state-dir>/<client-id>.json``, readable by its
owner only (0600), written atomically, together with the server it belongs to: a secret
is presented only to the server that issued it. A client without ``--client-id`` gets a
new id every start, so its secret lives in memory only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/fedstream``, or ``~/.local/state/fedstream``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedstream"


class CredentialKeeper:
    """Holds one client's credential for one server, in memory and (optionally) on disk."""

    def __init__(self, server: str, path: Path | None) -> None:
        self.server = server
        self.path = path
        self.secret: str | None = None
        if path is not None:
            self.secret = self._read(path)

    def _read(self, path: Path) -> str | None:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable credential file %s: %s", path, error)
            return None
        if not isinstance(record, dict) or record.get("server") != self.server:
            return None  # issued by another server: never shown to this one
        secret = record.get("credential")
        return secret if isinstance(secret, str) and secret else None

    def store(self, secret: str) -> None:
        """Keep a newly issued secret; a file that cannot be written leaves it in memory."""
        self.secret = secret
        if self.path is None:
            return
        record = json.dumps({"server": self.server, "credential": secret})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".credential.")
            try:
                with os.fdopen(fd, "w") as handle:  # mkstemp creates it 0600
                    handle.write(record)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            log.warning(
                "cannot keep this client's credential in %s (%s): after a restart this "
                "client cannot prove its --client-id",
                self.path,
                error,
            )
