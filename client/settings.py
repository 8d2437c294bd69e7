"""Settings of one fl-client process: every default in one place, validated once."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from fedstream.common.config import KeyValues
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "FL_CLIENT_"

# A host name (RFC 1123 labels; '_' too, as container service names use it), an IPv4
# address, or an IPv6 address in brackets, then a port.
_HOST_NAME = re.compile(
    r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*$"
)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError says what is wrong."""
    if "://" in address or address.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        raise ValueError(f"{address!r}: give host:port without a scheme (e.g. server:50051)")
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"{address!r} is not host:port ([IPv6]:port for IPv6)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError(f"{address!r} is not host:port (e.g. {address}:50051)")
        if ":" in host:
            raise ValueError(f"{address!r}: put an IPv6 address in brackets, e.g. [::1]:50051")
        if not _HOST_NAME.match(host):
            raise ValueError(f"{address!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


class ClientSettings(BaseModel):
    """Where the server is, which device and data this client uses, and local overrides.

    Fields left at None take the value the server sends (training hyper-parameters) or
    the server's run description (model, dataset, partitioning).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    server: str = Field("localhost:50051", description="server address as host:port")
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="stable client name (default: host name and process id)",
    )
    gpu: int | None = Field(None, ge=0, description="CUDA device index (absent = CPU)")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for training (default: all cores)"
    )
    data_dir: Path = Field(Path("data"), description="folder holding downloaded datasets")
    download: bool = Field(False, description="download the dataset into --data-dir if missing")
    task: str | None = Field(
        None,
        description="task to run: classification (built in) or package.module:Task; must be "
        "the server's (default: classification)",
    )
    task_opt: KeyValues = Field(
        default_factory=dict, description="task option key=value (over the server's)"
    )
    model: str | None = Field(
        None, description="model of the built-in task (default: the server's, if built in)"
    )
    dataset: str | None = Field(None, description="dataset override (default: the server's)")
    partition_index: int | None = Field(
        None, ge=0, description="data shard this client takes (default: assigned by the server)"
    )
    num_partitions: int | None = Field(
        None, ge=1, description="total number of shards (default: the server's)"
    )
    local_epochs: int | None = Field(None, ge=1, description="override the server's local epochs")
    batch_size: int | None = Field(None, ge=1, description="override the server's batch size")
    learning_rate: float | None = Field(None, gt=0, description="override the learning rate")
    optimizer: Literal["sgd", "adam"] | None = Field(None, description="override the optimizer")
    max_steps: int | None = Field(
        None, ge=0, description="stop local training after this many steps (0 = do not train)"
    )
    connect_timeout_s: float = Field(
        600.0, gt=0, description="give up when the server stays unreachable this long"
    )
    backoff_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(15.0, gt=0, description="longest reconnect delay")
    max_protocol_errors: int = Field(
        5, ge=1, description="give up (exit status 3) after this many refused downloads in a row"
    )
    download_stall_timeout_s: float = Field(
        60.0, gt=0, description="refuse a model download that brings no new bytes for this long"
    )
    chunk_size_bytes: int = Field(
        1 << 20, ge=1024, le=3 << 20, description="tensor bytes per streamed message"
    )
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle to verify the server: connect over TLS"
    )
    tls_cert: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_server_name: str | None = Field(
        None, description="name to expect in the server certificate (default: host of --server)"
    )
    token_file: Path | None = Field(None, description="file holding this client's token")
    token: SecretStr | None = Field(
        None, description="this client's token (prefer --token-file or FL_CLIENT_TOKEN)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="logging level"
    )
    state_dir: Path | None = Field(
        None,
        description="folder keeping this client's credential across restarts "
        "(default: ~/.local/state/fedstream)",
    )

    @field_validator("server")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClientSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert (mutual TLS) needs tls_ca to verify the server")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        for name in ("tls_ca", "tls_cert", "tls_key", "token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self

    def read_token(self) -> str | None:
        """The token to present, from --token or --token-file (never logged)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return None
