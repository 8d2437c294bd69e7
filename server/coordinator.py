"""Round state of the federation, owned by one coroutine (``Coordinator.run``).

RPC handlers only call the coordinator's methods; each method that mutates state runs
on the event loop without awaiting in between, so no locks guard round state. The one
lock (``_fold_lock``) orders folds into the sum against the closing of a round, because
folds run in a worker thread. Each fold is a task the round owns, not part of the RPC
handler that staged the upload, so a client that disconnects cannot cut a fold short.

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
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from fedstream.common.codec import Manifest, crc32_of
from fedstream.common.errors import AggregateError, ManifestError, RoundFailed, UploadRejected
from fedstream.common.messages import (
    EvaluationResult,
    FailureReport,
    FinishKind,
    PlanKind,
    RoundPlan,
    RunSpec,
    Scalar,
    UpdateHeader,
)
from fedstream.common.task import MAX_EXAMPLES, Metrics, weighted_mean
from fedstream.server.aggregate import DeltaAccumulator
from fedstream.server.registry import Admission, Attachment, ClientSession, Finish, Registry
from fedstream.server.upload import DEFAULT_MAX_ABS, UploadReceiver

log = logging.getLogger(__name__)


class RoundPhase(enum.Enum):
    """Lifecycle of one round.

    ::

        WAITING --(enough clients)--> COLLECTING --(all reported / deadline)--> AGGREGATING
           |                              |                                      |
           +--(join timeout)--> FAILED    +----(too few successes)--> FAILED     |
                                                                                 v
                             DONE <--(all evaluated / deadline)-- EVALUATING <---+
                               ^                                                 |
                               +------------(no federated evaluation)------------+

    EVALUATING sends the new global model to some clients (``--fraction-evaluate``)
    with an EVALUATE plan and collects their metrics; it never changes the model, and a
    client that fails it only misses from the round's federated metrics.
    """

    WAITING = "waiting"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


_TRANSITIONS = {
    RoundPhase.WAITING: {RoundPhase.COLLECTING, RoundPhase.FAILED},
    RoundPhase.COLLECTING: {RoundPhase.AGGREGATING, RoundPhase.FAILED},
    RoundPhase.AGGREGATING: {RoundPhase.EVALUATING, RoundPhase.DONE, RoundPhase.FAILED},
    RoundPhase.EVALUATING: {RoundPhase.DONE},
    RoundPhase.DONE: set(),
    RoundPhase.FAILED: set(),
}


@dataclass(frozen=True)
class ClientResult:
    client_id: str
    num_examples: int
    metrics: Mapping[str, float]
    train_started_unix_s: float
    train_finished_unix_s: float
    device: str
    upload_bytes: int = 0


@dataclass(frozen=True)
class ClientEvaluation:
    client_id: str
    num_examples: int
    metrics: Mapping[str, float]


def new_plan_id() -> str:
    """A fresh id for one attempt of one round (or one evaluation): never reused."""
    return secrets.token_hex(8)


@dataclass
class EvaluationState:
    """Federated evaluation of one round's new global model."""

    number: int
    plan_id: str
    selected: frozenset[str]
    results: dict[str, ClientEvaluation] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def record_failure(self, client_id: str, why: str) -> None:
        if client_id in self.selected and client_id not in self.results:
            if client_id not in self.failures:
                log.warning("round %d: client %s failed evaluation: %s", self.number,
                            client_id, why)
            self.failures[client_id] = why
            self._check_settled()

    def record(self, result: ClientEvaluation) -> None:
        self.failures.pop(result.client_id, None)
        self.results[result.client_id] = result
        self._check_settled()

    def _check_settled(self) -> None:
        if len(self.results) + len(self.failures) >= len(self.selected):
            self.settled.set()


@dataclass
class RoundState:
    number: int
    selected: frozenset[str]
    deadline: float  # loop.time()
    accumulator: DeltaAccumulator
    plan_id: str = field(default_factory=new_plan_id)
    phase: RoundPhase = RoundPhase.WAITING
    results: dict[str, ClientResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    why_failed: str = ""
    damaged: str = ""  # why the sum can no longer be trusted (a fold that was not undone)
    plan: RoundPlan | None = None  # what each selected client is sent

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
    plan_id: str = ""


@dataclass(frozen=True)
class RoundSummary:
    """What one completed round did: the aggregated metrics of training, of the
    server's own evaluation and of the federated evaluation, and every client's part."""

    round: int
    selected: int
    succeeded: int
    failures: Mapping[str, str]
    train: Mapping[str, float]
    server_eval: Mapping[str, float] | None
    wall_time_s: float
    clients: tuple[ClientResult, ...]
    federated_eval: Mapping[str, float] | None = None
    evaluations: tuple[ClientEvaluation, ...] = ()
    evaluation_failures: Mapping[str, str] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        """The server-side accuracy, when the task reports one."""
        return None if self.server_eval is None else self.server_eval.get("accuracy")


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
    run: RunSpec
    # The config map every selected client gets with its plan (local_epochs, ...).
    round_config: Mapping[str, Scalar] = field(default_factory=dict)
    max_clients: int = 1000
    max_num_examples: int = 1_000_000_000
    max_update_abs: float = DEFAULT_MAX_ABS
    # Federated evaluation after every N-th round (0: never) on this share of clients.
    evaluate_every: int = 0
    fraction_evaluate: float = 1.0


T = TypeVar("T")


async def _to_the_end(work: asyncio.Future[T]) -> T:
    """Await ``work`` until it is done, even when cancelled meanwhile (then re-raise).

    A worker thread cannot be stopped: a fold whose awaiting task gave up would go on
    adding to the sum after the fold lock was released.
    """
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return work.result()


Evaluate = Callable[[Mapping[str, torch.Tensor]], Metrics | None]
# Called after each completed round; True ends the run early (a stop rule was met).
OnRound = Callable[[RoundSummary, Mapping[str, torch.Tensor]], bool | None]
AggregateMetrics = Callable[[list[tuple[int, Metrics]]], dict[str, float]]


class Coordinator:
    """Runs rounds over a global model held as a ``state_dict`` of CPU tensors."""

    def __init__(
        self,
        config: CoordinatorConfig,
        global_state: dict[str, torch.Tensor],
        evaluate: Evaluate,
        on_round: OnRound,
        first_round: int = 1,
        aggregate_metrics: AggregateMetrics = weighted_mean,
    ) -> None:
        self.config = config
        self._aggregate_metrics = aggregate_metrics
        self.global_state = {k: v.detach().cpu().contiguous() for k, v in global_state.items()}
        self.manifest = Manifest.of(self.global_state)
        self._evaluate = evaluate
        self._on_round = on_round
        self.first_round = first_round
        self.registry = Registry(config.max_clients, config.run.num_partitions)
        self.current: RoundState | None = None
        self.evaluation: EvaluationState | None = None
        self.payload_crc = 0
        self.finished = False
        self._finish: Finish | None = None  # what every client is told once the run ends
        self._membership = asyncio.Condition()
        self._fold_lock = asyncio.Lock()
        self._uploading: set[str] = set()
        self._folding: dict[str, asyncio.Task[None]] = {}  # round-owned folds, by client
        self._detached = asyncio.Event()
        self._stop_early = False

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
            and state.plan is not None
            and state.phase is RoundPhase.COLLECTING
            and client_id in state.selected
            and client_id not in state.results
            and state.number not in carried
        ):
            # Its earlier stream took this round and then broke: send the round again.
            attachment.inbox.put_nowait(state.plan)
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
        if self.evaluation is not None:
            self.evaluation.record_failure(attachment.client_id, why)

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

    def selected_count(self, plan_id: str) -> int:
        """How many clients download the model under ``plan_id``."""
        for plan in (self.current, self.evaluation):
            if plan is not None and plan.plan_id == plan_id:
                return len(plan.selected)
        return 0

    def is_open(self, plan_id: str) -> bool:
        """Whether ``plan_id`` still wants answers (its download may go on)."""
        state, evaluation = self.current, self.evaluation
        if state is not None and state.plan_id == plan_id:
            return state.phase is RoundPhase.COLLECTING
        return (
            evaluation is not None
            and evaluation.plan_id == plan_id
            and state is not None
            and state.phase is RoundPhase.EVALUATING
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
        if header.plan_id != state.plan_id:
            # The same round number, but an earlier attempt of it (or a forged id).
            raise UploadRejected(
                f"{who}: upload for plan {header.plan_id!r} of round {header.round}; that "
                f"attempt is over (the round was retried)",
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
                *header.metrics.values(),
                report.train_started_unix_s,
                report.train_finished_unix_s,
            )
        ):
            raise UploadRejected(f"{who}: training report holds NaN or Inf", reason="non_finite")
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
        return UploadTicket(
            header.client_id, state.number, header.num_examples, header, state.plan_id
        )

    def end_upload(self, ticket: UploadTicket) -> None:
        """Release the client's upload slot, whatever became of the upload.

        A fold in progress keeps the slot until it ends (``_fold``), so a retry cannot
        stream a second copy in the meantime.
        """
        if ticket.client_id not in self._folding:
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
        """Validate the staged delta, then fold it into the round's sum exactly once.

        From this call on the round owns the staged upload: the fold runs in a task of
        its own, shielded from the RPC handler. A client that disconnects mid-fold (its
        handler cancelled) therefore cannot stop the fold half-way: it completes and
        counts, every byte having arrived and been checked (a retry then gets
        ALREADY_EXISTS, which a client reads as "landed"). A fold that fails part-way is
        undone (``UploadReceiver.fold_into``). The staged file is closed, and the
        client's upload slot released, only once the fold has ended.
        """
        fold = asyncio.create_task(
            self._fold(ticket, receiver), name=f"fold of {ticket.client_id} round {ticket.round}"
        )
        self._folding[ticket.client_id] = fold
        # Read the outcome even when no handler is left to: no "never retrieved" warning.
        fold.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(fold)

    async def _fold(self, ticket: UploadTicket, receiver: UploadReceiver) -> None:
        try:
            receiver.check_finite()  # found while the chunks arrived: no second pass
            async with self._fold_lock:
                state = self.current
                if state is None or not self.is_open(ticket.plan_id):
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
                if state.damaged:
                    raise UploadRejected(
                        f"client {ticket.client_id!r}: round {ticket.round} cannot count "
                        f"uploads any more ({state.damaged})",
                        reason="server_error",
                    )
                work = asyncio.get_running_loop().run_in_executor(
                    None, receiver.fold_into, state.accumulator, ticket.num_examples
                )
                try:
                    await _to_the_end(work)
                except AggregateError as error:
                    state.damaged = str(error)
                    log.error("round %d: %s", ticket.round, error)
                    raise UploadRejected(
                        f"client {ticket.client_id!r}: {error}", reason="server_error"
                    ) from error
                report = ticket.header.report
                state.record_success(
                    ClientResult(
                        ticket.client_id,
                        ticket.num_examples,
                        dict(ticket.header.metrics),
                        report.train_started_unix_s,
                        report.train_finished_unix_s,
                        report.device,
                        ticket.header.manifest.total_bytes,
                    )
                )
        finally:
            receiver.close()
            del self._folding[ticket.client_id]
            self._uploading.discard(ticket.client_id)
        log.debug(
            "round %d: client %s uploaded (%d examples)",
            ticket.round,
            ticket.client_id,
            ticket.num_examples,
        )

    def is_folding(self, client_id: str) -> bool:
        """Whether the round is folding (or about to fold) this client's upload."""
        return client_id in self._folding

    # ---- evaluation results and failure reports (called by handlers) -----------------

    def submit_evaluation(self, result: EvaluationResult) -> None:
        """Record a client's metrics for the open federated evaluation."""
        evaluation = self.evaluation
        who = f"client {result.client_id!r}"
        if evaluation is None or not self.is_open(result.plan_id):
            raise UploadRejected(
                f"{who}: evaluation for plan {result.plan_id!r} of round {result.round} is "
                "not open",
                reason="stale_round",
            )
        if result.client_id not in evaluation.selected:
            raise UploadRejected(
                f"{who} was not asked to evaluate round {evaluation.number}",
                reason="not_selected",
            )
        if result.client_id in evaluation.results:
            raise UploadRejected(
                f"{who} already evaluated round {evaluation.number}", reason="duplicate"
            )
        if not 1 <= result.num_examples <= MAX_EXAMPLES:
            raise UploadRejected(f"{who}: num_examples {result.num_examples} is outside 1..2**40")
        if not all(math.isfinite(v) for v in result.metrics.values()):
            raise UploadRejected(f"{who}: evaluation metrics hold NaN or Inf", reason="non_finite")
        evaluation.record(
            ClientEvaluation(result.client_id, result.num_examples, dict(result.metrics))
        )

    def report_failure(self, report: FailureReport) -> bool:
        """A client says why it fails its plan (or leaves): counted at once. Returns
        whether the report matched an open plan of that client."""
        state, evaluation = self.current, self.evaluation
        why = f"client reports: {report.reason}"
        counted = False
        if state is not None and state.phase is RoundPhase.COLLECTING and (
            report.plan_id == state.plan_id or (report.leaving and not report.plan_id)
        ):
            counted = report.client_id in state.selected and report.client_id not in state.results
            state.record_failure(report.client_id, why)
        if evaluation is not None and self.is_open(evaluation.plan_id) and (
            report.plan_id == evaluation.plan_id or (report.leaving and not report.plan_id)
        ):
            counted = counted or report.client_id in evaluation.selected
            evaluation.record_failure(report.client_id, why)
        log.warning(
            "client %s %s: %s", report.client_id,
            "leaves the run" if report.leaving else "failed its plan", report.reason,
        )
        return counted

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
        self.evaluation = None
        state.move_to(RoundPhase.COLLECTING)
        state.plan = plan = RoundPlan(
            round=number,
            plan_id=state.plan_id,
            kind=PlanKind.TRAIN,
            config=dict(self.config.round_config),
            deadline_unix_s=time.time() + self.config.round_timeout_s,
            manifest=self.manifest,
        )
        for client_id in sorted(selected):
            self.sessions[client_id].inbox.put_nowait(plan)
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
            if state.damaged:
                state.move_to(RoundPhase.FAILED)
                state.why_failed = state.damaged
                log.error("round %d failed: %s", number, state.damaged)
                return None
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
        server_eval = await asyncio.to_thread(self._evaluate, self.global_state)
        results = tuple(state.results[c] for c in sorted(state.results))
        train = self._aggregate_metrics([(r.num_examples, r.metrics) for r in results])
        evaluation = await self._evaluate_federated(state)
        summary = RoundSummary(
            round=number,
            selected=len(selected),
            succeeded=len(results),
            failures=dict(state.failures),
            train=train,
            server_eval=None if server_eval is None else dict(server_eval),
            wall_time_s=time.perf_counter() - started,
            clients=results,
            federated_eval=None if evaluation is None or not evaluation.results else
            self._aggregate_metrics(
                [(e.num_examples, e.metrics) for e in evaluation.results.values()]
            ),
            evaluations=() if evaluation is None else tuple(
                evaluation.results[c] for c in sorted(evaluation.results)
            ),
            evaluation_failures={} if evaluation is None else dict(evaluation.failures),
        )
        self._stop_early = bool(await asyncio.to_thread(self._on_round, summary,
                                                        self.global_state))
        state.move_to(RoundPhase.DONE)
        return summary

    def _evaluates(self, number: int) -> bool:
        every = self.config.evaluate_every
        return every > 0 and (number % every == 0 or number == self.config.rounds)

    async def _evaluate_federated(self, state: RoundState) -> EvaluationState | None:
        """Send the new global model to a share of the clients to evaluate on their own
        held-out data, and collect their metrics until all answered or the deadline."""
        if not self._evaluates(state.number):
            return None
        connected = self.connected_clients()
        want = max(1, math.ceil(self.config.fraction_evaluate * len(connected)))
        chosen = connected if want >= len(connected) else random.Random(
            self.config.seed * 100_019 + state.number
        ).sample(connected, want)
        if not chosen:
            return None
        state.move_to(RoundPhase.EVALUATING)
        self.payload_crc = await asyncio.to_thread(crc32_of, self.global_state, self.manifest)
        evaluation = EvaluationState(state.number, new_plan_id(), frozenset(chosen))
        self.evaluation = evaluation
        plan = RoundPlan(
            round=state.number,
            plan_id=evaluation.plan_id,
            kind=PlanKind.EVALUATE,
            config=dict(self.config.round_config),
            deadline_unix_s=time.time() + self.config.round_timeout_s,
            manifest=self.manifest,
        )
        for client_id in sorted(evaluation.selected):
            self.sessions[client_id].inbox.put_nowait(plan)
        try:
            async with asyncio.timeout(self.config.round_timeout_s):
                await evaluation.settled.wait()
        except TimeoutError:
            for client_id in sorted(evaluation.selected - evaluation.results.keys()):
                evaluation.failures.setdefault(client_id, "no evaluation within the round timeout")
        return evaluation

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
                if self._stop_early:
                    break
        finally:
            if self._stop_early:
                self.finish("run complete: its stop rule was met", FinishKind.RUN_COMPLETE)
            elif len(summaries) + self.first_round > self.config.rounds:
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
    """A round's metrics as one JSON-serialisable record (one line of metrics.jsonl).

    ``train`` holds the clients' aggregated training metrics, ``server_eval`` the
    server's own evaluation and ``federated_eval`` the clients' aggregated evaluation;
    ``train_loss``, ``test_loss`` and ``accuracy`` repeat the usual three at the top.
    """
    server_eval = summary.server_eval or {}
    return {
        "round": summary.round,
        "selected": summary.selected,
        "succeeded": summary.succeeded,
        "failures": dict(summary.failures),
        "train_loss": summary.train.get("loss"),
        "test_loss": server_eval.get("loss"),
        "accuracy": server_eval.get("accuracy"),
        "train": dict(summary.train),
        "server_eval": None if summary.server_eval is None else dict(summary.server_eval),
        "federated_eval": (
            None if summary.federated_eval is None else dict(summary.federated_eval)
        ),
        "wall_time_s": summary.wall_time_s,
        "clients": [dataclasses.asdict(r) for r in summary.clients],
        "evaluations": [dataclasses.asdict(e) for e in summary.evaluations],
        "evaluation_failures": dict(summary.evaluation_failures),
        "time_unix_s": time.time(),
    }
