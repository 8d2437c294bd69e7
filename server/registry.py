"""Membership: who has joined, under which credential, on which shard, and whether its
round stream is open.

The registry owns every client session; the coordinator asks it who can take part in a
round and tells it who did. Like the coordinator, it runs on the event loop only, so its
methods never await and need no locks.

A client id belongs to the client that first joined under it: that Join returns a
secret (:mod:`fedstream.server.credentials`) which every later Join, WatchRounds and
PushUpdate under the id must present. A client's own token (a ``client-id token`` line)
also proves the id, so a client that lost its secret can enrol again with it.

Each open WatchRounds stream is an :class:`Attachment` with its own inbox. When a client
opens a new stream before the old one is torn down (a reconnect that raced the old
connection's end), the old stream is told it was replaced and its teardown no longer
touches the session: only the live attachment can detach it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeAlias

from fedstream.common.errors import UploadRejected
from fedstream.common.messages import CREDENTIAL_METADATA_KEY, FinishKind, RoundPlan
from fedstream.server.credentials import Credential

log = logging.getLogger(__name__)


class SessionState(enum.Enum):
    """Lifecycle of one client's session.

    ::

        JOINED --(WatchRounds)--> ATTACHED --(its stream closes)--> IDLE
                                     ^                               |
                                     +---------(WatchRounds)---------+

    A Join under a known id (with its credential) keeps the session and its state.
    """

    JOINED = "joined"
    ATTACHED = "attached"
    IDLE = "idle"


_TRANSITIONS = {
    SessionState.JOINED: {SessionState.ATTACHED},
    SessionState.ATTACHED: {SessionState.ATTACHED, SessionState.IDLE},
    SessionState.IDLE: {SessionState.ATTACHED},
}


@dataclass(frozen=True)
class Finish:
    """The end of a client's round stream, and why (see FinishKind)."""

    reason: str
    kind: FinishKind = FinishKind.RUN_COMPLETE


Event: TypeAlias = RoundPlan | Finish


@dataclass(eq=False)
class Attachment:
    """One open WatchRounds stream; its inbox is read by that stream's handler alone."""

    client_id: str
    inbox: asyncio.Queue[Event]


@dataclass(eq=False)
class ClientSession:
    client_id: str
    partition_index: int
    credential: Credential
    state: SessionState = SessionState.JOINED
    # Events for the live stream, or kept for the next one while there is none (a round
    # that is still open when the client reconnects is sent to it then).
    inbox: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    attachment: Attachment | None = None
    told_finish: bool = False

    @property
    def connected(self) -> bool:
        return self.state is SessionState.ATTACHED

    def move_to(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"client {self.client_id}: illegal move {self.state} -> {state}")
        self.state = state


@dataclass(frozen=True)
class Admission:
    """A successful Join: the session, and the secret when one was issued."""

    session: ClientSession
    secret: str | None


class Registry:
    """Client sessions of one server, keyed by client id."""

    def __init__(self, max_clients: int, num_partitions: int) -> None:
        self.max_clients = max_clients
        self.num_partitions = num_partitions
        self.sessions: dict[str, ClientSession] = {}

    # ---- admission -------------------------------------------------------------------

    def join(
        self,
        client_id: str,
        partition_hint: int | None,
        presented: str | None,
        owns_id: bool = False,
    ) -> Admission:
        """Admit a Join under ``client_id``; ``owns_id``: it presented that id's own token."""
        session = self.sessions.get(client_id)
        if session is not None:
            if session.credential.admits(presented):
                log.info(
                    "client %s joined again (partition %d)", client_id, session.partition_index
                )
                return Admission(session, None)
            if not owns_id:
                raise UploadRejected(
                    f"client id {client_id!r} is taken: this Join did not present the "
                    f"credential issued to it ({CREDENTIAL_METADATA_KEY} metadata); another "
                    "process holds this id, or this client lost its state (--state-dir)",
                    reason="unauthenticated",
                )
            session.credential, secret = Credential.issue()
            log.warning(
                "client %s enrolled again with its own token: the credential issued before "
                "no longer works",
                client_id,
            )
            return Admission(session, secret)
        if len(self.sessions) >= self.max_clients:
            raise UploadRejected(
                f"client {client_id!r} refused: {self.max_clients} clients already joined "
                "(--max-clients)",
                reason="busy",
            )
        credential, secret = Credential.issue()
        session = ClientSession(client_id, self._shard_for(client_id, partition_hint), credential)
        self.sessions[client_id] = session
        log.info("client %s joined (partition %d)", client_id, session.partition_index)
        return Admission(session, secret)

    def verify(self, client_id: str, presented: str | None) -> ClientSession:
        """The session of ``client_id`` if ``presented`` is its credential."""
        session = self.sessions.get(client_id)
        if session is None:
            raise UploadRejected(f"client {client_id!r} has not joined", reason="unknown_client")
        if not session.credential.admits(presented):
            raise UploadRejected(
                f"client {client_id!r}: the call did not present this client's credential "
                f"({CREDENTIAL_METADATA_KEY} metadata)",
                reason="unauthenticated",
            )
        return session

    def _shard_for(self, client_id: str, hint: int | None) -> int:
        """The shard a new client trains on: its own choice, else the least-held one.

        A shard nobody holds comes first; then one whose holders have all left (their
        round stream closed: a client restarted under a new id leaves its old shard
        behind); a shard that a joined or connected client holds only when every shard
        is held, since two clients on one shard train on the same data.
        """
        if hint is not None and hint < self.num_partitions:
            return hint
        present: Counter[int] = Counter()
        gone: Counter[int] = Counter()
        for session in self.sessions.values():
            holders = gone if session.state is SessionState.IDLE else present
            holders[session.partition_index] += 1
        index = min(range(self.num_partitions), key=lambda i: (present[i], gone[i], i))
        if present[index]:
            log.warning(
                "client %s shares data shard %d: more clients than the %d shards "
                "(--num-partitions)",
                client_id,
                index,
                self.num_partitions,
            )
        elif gone[index]:
            left = sorted(
                s.client_id
                for s in self.sessions.values()
                if s.partition_index == index and s.state is SessionState.IDLE
            )
            log.info("client %s takes data shard %d, left by %s", client_id, index, ", ".join(left))
        return index

    # ---- round streams ---------------------------------------------------------------

    def attach(self, session: ClientSession) -> tuple[Attachment, frozenset[int]]:
        """Open a round stream for ``session``; an older open stream is told it is replaced.

        Round tasks still waiting in the session's inbox move to the new stream; returns
        the stream and the round numbers it carries. A Finish is not carried: the
        coordinator tells each new stream itself when the run is over.
        """
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        carried: set[int] = set()
        while not session.inbox.empty():
            event = session.inbox.get_nowait()
            if isinstance(event, RoundPlan):
                inbox.put_nowait(event)
                carried.add(event.round)
        old = session.attachment
        if old is not None:
            # A reconnect raced the old stream's teardown: the newest stream wins.
            old.inbox.put_nowait(Finish("replaced by a newer connection", FinishKind.REPLACED))
        session.inbox = inbox
        attachment = Attachment(session.client_id, inbox)
        session.attachment = attachment
        session.move_to(SessionState.ATTACHED)
        return attachment, frozenset(carried)

    def detach(self, attachment: Attachment) -> bool:
        """Close ``attachment``'s stream; False (and nothing changes) if it was replaced."""
        session = self.sessions.get(attachment.client_id)
        if session is None or session.attachment is not attachment:
            return False
        session.attachment = None
        session.move_to(SessionState.IDLE)
        return True

    def attached(self) -> list[str]:
        """Ids of the clients whose round stream is open, sorted."""
        return sorted(cid for cid, s in self.sessions.items() if s.connected)
