"""The exceptions fedstream raises, one small hierarchy so callers can map them once.

Transport adapters translate these into gRPC status codes in a single place
(``fedstream.server.servicer``); domain code never imports grpc.
"""

from __future__ import annotations


class FedstreamError(Exception):
    """Base class of every error fedstream raises on purpose."""


class ManifestError(FedstreamError):
    """A manifest or payload does not describe valid tensors."""


class ConfigError(FedstreamError):
    """A setting, model name or dataset name is not usable."""


class UploadRejected(FedstreamError):
    """An upload was refused; ``reason`` says which rule it broke."""

    #: one of: "malformed", "unknown_client", "stale_round", "not_selected", "duplicate",
    #: "checksum", "non_finite", "out_of_range", "too_large", "unauthenticated", "busy",
    #: "server_error"
    reason: str = "malformed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class AggregateError(FedstreamError):
    """A round's aggregate cannot replace the global model (not finite, or its sum is
    damaged by a fold that could not be undone)."""


class RoundFailed(FedstreamError):
    """A round ended without enough successful clients."""


class TransferError(FedstreamError):
    """A model download was incomplete, corrupt or inconsistent."""


class TaskError(FedstreamError):
    """A task cannot be loaded, or its model, data, config or metrics are not usable."""
