"""In-process messages shared by server and client (protobuf objects never leave the
transport adapters; ``fedstream.common.wire`` converts between the two)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedstream.common.codec import Manifest

PROTOCOL_VERSION = 2

# A value of a round's config map: what a task's config may hold.
Scalar = bool | int | float | str

# Call metadata carrying the secret a client's first Join returned (JoinReply.credential);
# every later call under that client id presents it.
CREDENTIAL_METADATA_KEY = "fedstream-credential"


@dataclass(frozen=True)
class RunSpec:
    """What the federation trains; a client follows it unless told otherwise locally."""

    model: str
    dataset: str
    seed: int
    test_fraction: float
    num_partitions: int
    partition: str
    dirichlet_alpha: float
    task: str = "classification"
    task_options: Mapping[str, str] = field(default_factory=dict)
    task_fingerprint: str = ""


class PlanKind(enum.Enum):
    """What a client does with the weights of a plan."""

    TRAIN = "train"  # train, upload the delta
    EVALUATE = "evaluate"  # evaluate on the client's held-out data, submit the metrics


@dataclass(frozen=True)
class RoundPlan:
    """One attempt of one round for one client, as the server sends it.

    ``plan_id`` is fresh for every attempt (a retried round gets a new one), so an upload
    made for an earlier attempt can never count in a later one; ``config`` is what the
    server (and its strategy) chose for this client this round.
    """

    round: int
    plan_id: str
    kind: PlanKind
    config: Mapping[str, Scalar]
    deadline_unix_s: float
    manifest: Manifest


@dataclass(frozen=True)
class TrainReport:
    steps: int
    train_started_unix_s: float
    train_finished_unix_s: float
    device: str


@dataclass(frozen=True)
class UpdateHeader:
    client_id: str
    round: int
    num_examples: int
    manifest: Manifest
    report: TrainReport
    plan_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationResult:
    """A client's metrics of the global model on its own held-out data."""

    client_id: str
    round: int
    plan_id: str
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class FailureReport:
    """Why a client fails a plan (``plan_id``) or leaves the run (``leaving``)."""

    client_id: str
    plan_id: str
    reason: str
    leaving: bool = False


class FinishKind(enum.Enum):
    """Why the server ends a client's round stream, and so what the client does next."""

    RUN_COMPLETE = "run_complete"  # every round ran: the client exits 0
    SERVER_STOPPING = "server_stopping"  # stopped early: the client waits and reconnects
    REPLACED = "replaced"  # a newer stream under the same client id took over
