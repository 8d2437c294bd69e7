"""In-process messages shared by server and client (protobuf objects never leave the
transport adapters; ``fedstream.common.wire`` converts between the two)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedstream.common.codec import Manifest

PROTOCOL_VERSION = 1

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


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters for one round."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    deadline_unix_s: float = 0.0


@dataclass(frozen=True)
class RoundTask:
    round: int
    config: TrainConfig
    manifest: Manifest


@dataclass(frozen=True)
class TrainReport:
    train_loss: float
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


class FinishKind(enum.Enum):
    """Why the server ends a client's round stream, and so what the client does next."""

    RUN_COMPLETE = "run_complete"  # every round ran: the client exits 0
    SERVER_STOPPING = "server_stopping"  # stopped early: the client waits and reconnects
    REPLACED = "replaced"  # a newer stream under the same client id took over
