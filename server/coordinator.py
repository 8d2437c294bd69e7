"""Round state of the federation, owned by one coroutine (``Coordinator.run``).

RPC handlers only call the coordinator's methods; each method that mutates state runs
on the event loop without awaiting in between, so no locks guard round state. The one
lock (``_fold_lock``) orders folds into the sum against the closing of a round, because
folds run in a worker thread.

Round outcome = successes + failures. A client that disconnects, sends a bad upload or
misses the deadline is a failure entry for that round, never a hang: the round closes
when every selected client has succeeded or failed, or at the deadline, and counts when
at least ``min_clients`` succeeded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fedstream.common.codec import Manifest, crc32_of
from fedstream.common.errors import AggregateError, ManifestError, RoundFailed, UploadRejected
from fedstream.common.messages import FinishKind, RoundTask, RunSpec, TrainConfig, UpdateHeader
from fedstream.server.aggregate import DeltaAccumulator
from fedstream.server.registry import Admission, Attachment, ClientSession, Finish, Registry
from fedstream.server.upload import DEFAULT_MAX_ABS, UploadReceiver

log = logging.getLogger(__name__)


class RoundPhase(enum.Enum):
    """Lifecycle of one round.

    ::

        WAITING --(enough clients)--> COLLECTING --(all reported / deadline)--> AGGREGATING
           |                              |                                      |
           +--(join timeout)--> FAILED    +----(too few successes)--> FAILED     +--> DONE
    """

    WAITING = "waiting"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"


_TRANSITIONS = {
    RoundPhase.WAITING: {RoundPhase.COLLECTING, RoundPhase.FAILED},
    RoundPhase.COLLECTING: {RoundPhase.AGGREGATING, RoundPhase.FAILED},
    RoundPhase.AGGREGATING: {RoundPhase.DONE, RoundPhase.FAILED},
    RoundPhase.DONE: set(),
    RoundPhase.FAILED: set(),
}


@dataclass(frozen=True)
class ClientResult:
    client_id: str
    num_examples: int
    train_loss: float
    train_started_unix_s: float
    train_finished_unix_s: float
    device: str


@dataclass
class RoundState:
    number: int
    selected: frozenset[str]
    deadline: float  # loop.time()
    accumulator: DeltaAccumulator
    phase: RoundPhase = RoundPhase.WAITING
    results: dict[str, ClientResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    why_failed: str = ""
    task: RoundTask | None = None  # what each selected client is sent

    def move_to(self, phase: RoundPhase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"round {self.number}: illegal move {self.phase} -> {phase}")
        self.phase = phase

    def record_failure(self, client_id: str, why: str) -> None:
        if self.phase is not RoundPhase.COLLECTING or client_id in self.results:
            return
        if client_id in self.selected and client_id not in self.failures:
            self.failures[client_id] = why
            log.warning("round %d: client %s failed: %s", self.number, client_id, why)
            self._check_settled()

    def record_success(self, result: ClientResult) -> None:
        self.failures.pop(result.client_id, None)
        self.results[result.client_id] = result
        self._check_settled()

    def _check_settled(self) -> None:
        if len(self.results) + len(self.failures) >= len(self.selected):
            self.settled.set()


@dataclass(frozen=True)
class UploadTicket:
    """Permission to stream one client's delta for one round."""

    client_id: str
    round: int
    num_examples: int
    header: UpdateHeader


@dataclass(frozen=True)
class RoundSummary:
    round: int
    selected: int
    succeeded: int
    failures: Mapping[str, str]
    train_loss: float
    test_loss: float | None
    accuracy: float | None
    wall_time_s: float
    clients: tuple[ClientResult, ...]


@dataclass(frozen=True)
class CoordinatorConfig:
    rounds: int
    min_clients: int
    clients_per_round: int
    round_timeout_s: float
    join_timeout_s: float
    round_retries: int
    server_lr: float
    chunk_size_bytes: int
    spool_memory_bytes: int
    spool_dir: Path | None
    seed: int
    train: TrainConfig
    run: RunSpec
    max_clients: int = 1000
    max_num_examples: int = 1_000_000_000
    max_update_abs: float = DEFAULT_MAX_ABS


Evaluate = Callable[[Mapping[str, torch.Tensor]], tuple[float, float] | None]
OnRound = Callable[[RoundSummary, Mapping[str, torch.Tensor]], None]


class Coordinator:
    """Runs rounds over a global model held as a ``state_dict`` of CPU tensors."""

    def __init__(
        self,
        config: CoordinatorConfig,
        global_state: dict[str, torch.Tensor],
        evaluate: Evaluate,
        on_round: OnRound,
        first_round: int = 1,
    ) -> None:
        self.config = config
        self.global_state = {k: v.detach().cpu().contiguous() for k, v in global_state.items()}
        self.manifest = Manifest.of(self.global_state)
        self._evaluate = evaluate
        self._on_round = on_round
        self.first_round = first_round
        self.registry = Registry(config.max_clients, config.run.num_partitions)
        self.current: RoundState | None = None
        self.payload_crc = 0
        self.finished = False
        self._finish: Finish | None = None  # what every client is told once the run ends
        self._membership = asyncio.Condition()
        self._fold_lock = asyncio.Lock()
        self._uploading: set[str] = set()
        self._detached = asyncio.Event()

    # ---- membership (called by handlers) -------------------------------------------

    @property
    def sessions(self) -> dict[str, ClientSession]:
        sessions: dict[str, ClientSession] = self.registry.sessions
        return sessions

    def join(
        self,
        client_id: str,
        partition_hint: int | None = None,
        credential: str | None = None,
        owns_id: bool = False,
    ) -> Admission:
        return self.registry.join(client_id, partition_hint, credential, owns_id)

    async def attach(self, client_id: str, credential: str | None) -> Attachment:
        session = self.registry.verify(client_id, credential)
        attachment, carried = self.registry.attach(session)
        log.debug("client %s is waiting for rounds", client_id)
        state = self.current
        if self._finish is not None:
            attachment.inbox.put_nowait(self._finish)
        elif (
            state is not None
            and state.task is not None
            and state.phase is RoundPhase.COLLECTING
            and client_id in state.selected
            and client_id not in state.results
            and state.number not in carried
        ):
            # Its earlier stream took this round and then broke: send the round again.
            attachment.inbox.put_nowait(state.task)
        async with self._membership:
            self._membership.notify_all()
        return attachment

    def detach(self, attachment: Attachment, why: str) -> None:
        """The end of one round stream; a stream already replaced by a newer one changes
        nothing (its client is still connected, through the newer stream)."""
        if not self.registry.detach(attachment):
            log.debug("client %s: a replaced round stream closed", attachment.client_id)
            return
        self._detached.set()
        if self.current is not None:
            self.current.record_failure(attachment.client_id, why)

    def finish_delivered(self, client_id: str) -> None:
        session = self.sessions.get(client_id)
        if session is not None:
            session.told_finish = True
        self._detached.set()

    async def wait_all_told(self) -> None:
        """Return once every client that joined has been told the run is over.

        Used to drain at shutdown: a client that was restarting when the last round ended
        still gets its Finish when it reconnects, instead of retrying until its connect
        timeout. Callers bound the wait (a client that died for good never comes back).
        """
        while not all(session.told_finish for session in self.sessions.values()):
            self._detached.clear()
            await self._detached.wait()

    def connected_clients(self) -> list[str]:
        attached: list[str] = self.registry.attached()
        return attached

    # ---- download (called by the WatchRounds handler) ----------------------------------

    def selected_count(self, round_number: int) -> int:
        state = self.current
        return len(state.selected) if state is not None and state.number == round_number else 0

    def is_open(self, round_number: int) -> bool:
        state = self.current
        return (
            state is not None
            and state.number == round_number
            and state.phase is RoundPhase.COLLECTING
        )

    # ---- upload (called by the PushUpdate handler) -------------------------------------

    def begin_upload(self, header: UpdateHeader) -> UploadTicket:
        state = self.current
        who = f"client {header.client_id!r}"
        if header.client_id not in self.sessions:
            raise UploadRejected(f"{who} is not known; join first", reason="unknown_client")
        if (
            state is None
            or header.round != state.number
            or state.phase is not RoundPhase.COLLECTING
        ):
            now = "none" if state is None else f"{state.number} ({state.phase.value})"
            raise UploadRejected(
                f"{who}: upload for round {header.round}, current round is {now}",
                reason="stale_round",
            )
        if header.client_id not in state.selected:
            raise UploadRejected(
                f"{who} was not selected for round {state.number}", reason="not_selected"
            )
        if header.client_id in state.results:
            raise UploadRejected(
                f"{who} already uploaded for round {state.number}", reason="duplicate"
            )
        if header.client_id in self._uploading:
            raise UploadRejected(f"{who} already has an upload in progress", reason="busy")
        report = header.report
        if not all(
            math.isfinite(value)
            for value in (
                report.train_loss,
                report.train_started_unix_s,
                report.train_finished_unix_s,
            )
        ):
            raise UploadRejected(f"{who}: training report holds NaN or Inf")
        if header.num_examples < 1:
            raise UploadRejected(f"{who}: num_examples must be positive")
        if header.num_examples > self.config.max_num_examples:
            raise UploadRejected(
                f"{who}: num_examples {header.num_examples} is more than the "
                f"{self.config.max_num_examples} allowed (--max-num-examples)"
            )
        difference = self.manifest.describe_difference(header.manifest)
        if difference is not None:
            raise ManifestError(f"{who}, round {state.number}: {difference}")
        self._uploading.add(header.client_id)
        return UploadTicket(header.client_id, state.number, header.num_examples, header)

    def end_upload(self, ticket: UploadTicket) -> None:
        """Release the client's upload slot, whatever became of the upload."""
        self._uploading.discard(ticket.client_id)

    def upload_failed(self, client_id: str, round_number: int, why: str) -> None:
        """Record a broken or refused upload as this client's failure for the round.

        Only a selected client's upload for the open round counts; a later good upload
        in the same round still replaces the failure.
        """
        state = self.current
        if state is not None and state.number == round_number:
            state.record_failure(client_id, why)

    def new_receiver(self) -> UploadReceiver:
        return UploadReceiver(
            self.manifest,
            self.config.spool_memory_bytes,
            self.config.spool_dir,
            self.config.max_update_abs,
        )

    async def commit_upload(self, ticket: UploadTicket, receiver: UploadReceiver) -> None:
        """Validate the staged delta, then fold it into the round's sum exactly once."""
        receiver.check_finite()  # found while the chunks arrived: no second pass
        async with self._fold_lock:
            state = self.current
            if state is None or not self.is_open(ticket.round):
                raise UploadRejected(
                    f"client {ticket.client_id!r}: round {ticket.round} closed before the "
                    "upload completed",
                    reason="stale_round",
                )
            if ticket.client_id in state.results:
                raise UploadRejected(
                    f"client {ticket.client_id!r} already uploaded for round {ticket.round}",
                    reason="duplicate",
                )
            await asyncio.to_thread(receiver.fold_into, state.accumulator, ticket.num_examples)
            report = ticket.header.report
            state.record_success(
                ClientResult(
                    ticket.client_id,
                    ticket.num_examples,
                    report.train_loss,
                    report.train_started_unix_s,
                    report.train_finished_unix_s,
                    report.device,
                )
            )
        log.debug(
            "round %d: client %s uploaded (%d examples, loss %.4f)",
            ticket.round,
            ticket.client_id,
            ticket.num_examples,
            report.train_loss,
        )

    # ---- the round loop ------------------------------------------------------------

    async def _wait_for_clients(self) -> None:
        needed = self.config.min_clients

        def enough() -> bool:
            return len(self.connected_clients()) >= needed

        if not enough():
            log.info("waiting for %d clients (%d connected)", needed, len(self.connected_clients()))
        async with self._membership:
            try:
                async with asyncio.timeout(self.config.join_timeout_s):
                    await self._membership.wait_for(enough)
            except TimeoutError:
                raise RoundFailed(
                    f"only {len(self.connected_clients())} of the {needed} required clients "
                    f"connected within {self.config.join_timeout_s:g}s"
                ) from None

    def _select(self, round_number: int) -> frozenset[str]:
        connected = self.connected_clients()
        want = self.config.clients_per_round or len(connected)
        if want >= len(connected):
            return frozenset(connected)
        return frozenset(
            random.Random(self.config.seed * 100_003 + round_number).sample(connected, want)
        )

    async def _run_round(self, number: int) -> RoundSummary | None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        # The model is serialised once per round: one checksum, shared by every download.
        self.payload_crc = await asyncio.to_thread(crc32_of, self.global_state, self.manifest)
        # Zeroing the sum writes a model's worth of memory (seconds for a large model):
        # done off the event loop, which meanwhile keeps serving RPCs.
        accumulator = await asyncio.to_thread(DeltaAccumulator, self.manifest)
        selected = self._select(number)
        state = RoundState(
            number=number,
            selected=selected,
            deadline=loop.time() + self.config.round_timeout_s,
            accumulator=accumulator,
        )
        self.current = state
        state.move_to(RoundPhase.COLLECTING)
        state.task = task = RoundTask(
            number,
            dataclasses.replace(
                self.config.train, deadline_unix_s=time.time() + self.config.round_timeout_s
            ),
            self.manifest,
        )
        for client_id in sorted(selected):
            self.sessions[client_id].inbox.put_nowait(task)
        log.debug("round %d: started with %d clients", number, len(selected))
        try:
            async with asyncio.timeout_at(state.deadline):
                await state.settled.wait()
        except TimeoutError:
            pass
        async with self._fold_lock:
            for client_id in sorted(selected - state.results.keys() - state.failures.keys()):
                state.failures[client_id] = (
                    f"no upload within the {self.config.round_timeout_s:g}s round timeout"
                )
                log.warning("round %d: client %s missed the deadline", number, client_id)
            if len(state.results) < self.config.min_clients:
                state.move_to(RoundPhase.FAILED)
                state.why_failed = f"fewer than {self.config.min_clients} clients reported"
                log.error(
                    "round %d failed: %d of %d selected clients reported, %d required (%s)",
                    number,
                    len(state.results),
                    len(selected),
                    self.config.min_clients,
                    "; ".join(f"{c}: {w}" for c, w in sorted(state.failures.items())),
                )
                return None
            state.move_to(RoundPhase.AGGREGATING)
        try:
            await asyncio.to_thread(
                state.accumulator.apply_to, self.global_state, self.config.server_lr
            )
        except AggregateError as error:
            state.move_to(RoundPhase.FAILED)
            state.why_failed = f"its aggregate was refused: {error}"
            log.error("round %d failed: %s", number, state.why_failed)
            return None
        evaluation = await asyncio.to_thread(self._evaluate, self.global_state)
        results = tuple(state.results[c] for c in sorted(state.results))
        total = sum(r.num_examples for r in results)
        summary = RoundSummary(
            round=number,
            selected=len(selected),
            succeeded=len(results),
            failures=dict(state.failures),
            # Weights below 1 first: a finite loss of 1e300 times its examples would not be.
            train_loss=sum(r.train_loss * (r.num_examples / total) for r in results),
            test_loss=None if evaluation is None else evaluation[0],
            accuracy=None if evaluation is None else evaluation[1],
            wall_time_s=time.perf_counter() - started,
            clients=results,
        )
        await asyncio.to_thread(self._on_round, summary, self.global_state)
        state.move_to(RoundPhase.DONE)
        return summary

    async def run(self) -> list[RoundSummary]:
        """Run every round; raise RoundFailed when a round cannot be completed."""
        summaries: list[RoundSummary] = []
        try:
            for number in range(self.first_round, self.config.rounds + 1):
                for attempt in range(self.config.round_retries + 1):
                    await self._wait_for_clients()
                    summary = await self._run_round(number)
                    if summary is not None:
                        summaries.append(summary)
                        break
                    if attempt < self.config.round_retries:
                        log.warning(
                            "round %d: retrying (%d/%d)",
                            number,
                            attempt + 1,
                            self.config.round_retries,
                        )
                else:
                    why = "" if self.current is None else self.current.why_failed
                    raise RoundFailed(
                        f"round {number} failed {self.config.round_retries + 1} times "
                        f"(last: {why})"
                    )
        finally:
            if len(summaries) + self.first_round > self.config.rounds:
                self.finish("run complete", FinishKind.RUN_COMPLETE)
            else:
                self.finish("run stopped before its last round", FinishKind.SERVER_STOPPING)
        return summaries

    def finish(self, reason: str, kind: FinishKind) -> None:
        """Tell every client the run is over for this server; the first call decides."""
        if self._finish is not None:
            return
        self.finished = True
        self._finish = Finish(reason, kind)
        for session in self.sessions.values():
            session.inbox.put_nowait(self._finish)


def summary_record(summary: RoundSummary) -> dict[str, Any]:
    """A round's metrics as one JSON-serialisable record."""
    return {
        "round": summary.round,
        "selected": summary.selected,
        "succeeded": summary.succeeded,
        "failures": dict(summary.failures),
        "train_loss": summary.train_loss,
        "test_loss": summary.test_loss,
        "accuracy": summary.accuracy,
        "wall_time_s": summary.wall_time_s,
        "clients": [dataclasses.asdict(r) for r in summary.clients],
        "time_unix_s": time.time(),
    }
