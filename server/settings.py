"""Settings of one fl-server process: every default in one place, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fedstream.common.config import KeyValues
from fedstream.common.records import MetricGoal, StopRule
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "FL_SERVER_"


class ServerSettings(BaseModel):
    """What the server listens on, what it trains and how it runs rounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("[::]", description="address to listen on ([::] is every interface)")
    port: int = Field(50051, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    rounds: int = Field(10, ge=1, description="number of federated rounds to run")
    min_clients: int = Field(2, ge=1, description="clients that must report for a round to count")
    clients_per_round: int = Field(
        0, ge=0, description="clients selected each round (0 = every connected client)"
    )
    round_timeout_s: float = Field(
        300.0, gt=0, description="seconds a round waits for uploads before closing"
    )
    join_timeout_s: float = Field(
        600.0, gt=0, description="seconds to wait for --min-clients clients to connect"
    )
    round_retries: int = Field(
        2, ge=0, description="times a round that missed --min-clients is retried before failing"
    )
    task: str = Field(
        "classification",
        description="task: classification (built in), package.module:Task or package.module",
    )
    task_opt: KeyValues = Field(
        default_factory=dict, description="task option key=value, sent to clients too"
    )
    model: str = Field(
        "cnn", description="model: cnn, a torchvision name (resnet18, ...) or module:function"
    )
    dataset: str = Field(
        "digits", description="dataset: digits, mnist, fashion-mnist, cifar10 or module:function"
    )
    data_dir: Path = Field(Path("data"), description="folder holding downloaded datasets")
    download: bool = Field(False, description="download the dataset into --data-dir if missing")
    seed: int = Field(0, ge=0, description="seed for the train/test split, init and selection")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the dataset held out for server evaluation"
    )
    num_partitions: int = Field(
        0, ge=0, description="data shards handed out to clients (0 = --min-clients)"
    )
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how shards split labels")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID)")
    local_epochs: int = Field(1, ge=1, description="local epochs each client trains per round")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    learning_rate: float = Field(0.05, gt=0, description="local learning rate")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="local optimizer")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="local L2 weight decay")
    round_config: KeyValues = Field(
        default_factory=dict, description="extra round config key=value sent to every client"
    )
    server_lr: float = Field(1.0, gt=0, description="server step size on the averaged delta")
    evaluate: bool = Field(True, description="evaluate the global model after every round")
    evaluate_every: int = Field(
        1, ge=0, description="federated evaluation on the clients every N rounds (0 = never)"
    )
    fraction_evaluate: float = Field(
        1.0, gt=0, le=1, description="share of connected clients asked to evaluate"
    )
    save_best: str | None = Field(
        None, description="also keep best.pt for METRIC (METRIC:min / METRIC:max)"
    )
    stop_when: str | None = Field(
        None, description='end the run once a round meets this, e.g. "accuracy>=0.97"'
    )
    out: Path = Field(Path("runs/latest"), description="folder for checkpoint and metrics")
    chunk_size_bytes: int = Field(
        1 << 20, ge=1024, le=3 << 20, description="tensor bytes per streamed message"
    )
    spool_memory_bytes: int = Field(
        1 << 20, ge=0, description="bytes of one upload staged in memory before spilling to disk"
    )
    resume: bool = Field(
        True, description="continue from the checkpoint in --out when there is one"
    )
    max_clients: int = Field(
        1000, ge=1, description="most clients that may join; more get RESOURCE_EXHAUSTED"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mTLS)"
    )
    token_file: Path | None = Field(
        None,
        description="file of 'client-id token' lines ('*' = shared join token); "
        "clients must present a token",
    )
    spool_dir: Path | None = Field(
        None, description="folder for uploads staged on disk (default: the system temp folder)"
    )
    max_num_examples: int = Field(
        1_000_000_000,
        ge=1,
        description="most training examples one upload may claim; more get INVALID_ARGUMENT",
    )
    max_update_abs: float = Field(
        1e15,
        gt=0,
        allow_inf_nan=False,
        description="largest |value| an uploaded delta may hold; more get INVALID_ARGUMENT",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="logging level"
    )

    @field_validator("save_best")
    @classmethod
    def _goal(cls, value: str | None) -> str | None:
        if value is not None:
            MetricGoal.parse(value)
        return value

    @field_validator("stop_when")
    @classmethod
    def _rule(cls, value: str | None) -> str | None:
        if value is not None:
            StopRule.parse(value)
        return value

    @model_validator(mode="after")
    def _selection_fits(self) -> ServerSettings:
        if self.clients_per_round and self.clients_per_round < self.min_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) is below "
                f"min_clients ({self.min_clients}): no round could ever count"
            )
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.spool_dir is not None and not self.spool_dir.is_dir():
            raise ValueError(f"spool_dir: {self.spool_dir} is not a folder")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @property
    def partitions(self) -> int:
        return self.num_partitions or self.min_clients
