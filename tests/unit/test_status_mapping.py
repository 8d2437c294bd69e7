"""Each refusal reason maps to one gRPC status code, in one place (``status_for``).

The expected codes are written out here so a change to the mapping is a visible,
deliberate edit to this table; clients rely on them (ALREADY_EXISTS means an earlier
upload landed; DATA_LOSS invites a retry; FAILED_PRECONDITION does not).
"""

from __future__ import annotations

import inspect
import re

import grpc
import pytest
from fedstream.common.errors import (
    ConfigError,
    FedstreamError,
    ManifestError,
    RoundFailed,
    TransferError,
    UploadRejected,
)
from fedstream.server.servicer import status_for

EXPECTED = {
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "non_finite": grpc.StatusCode.INVALID_ARGUMENT,
    "out_of_range": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_client": grpc.StatusCode.NOT_FOUND,
    "stale_round": grpc.StatusCode.FAILED_PRECONDITION,
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "checksum": grpc.StatusCode.DATA_LOSS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "server_error": grpc.StatusCode.UNAVAILABLE,
}


@pytest.mark.parametrize(("reason", "code"), sorted(EXPECTED.items()))
def test_upload_rejected_reason_maps_to_its_status(reason: str, code: grpc.StatusCode) -> None:
    assert status_for(UploadRejected("refused", reason=reason)) == code


def test_every_documented_reason_is_in_the_table() -> None:
    # UploadRejected lists its reasons in the comment above ``reason``; keep both in step.
    comments = [
        line for line in inspect.getsource(UploadRejected).splitlines()
        if line.strip().startswith("#")
    ]
    documented = set(re.findall(r'"(\w+)"', "\n".join(comments)))
    assert documented == set(EXPECTED)


def test_upload_rejected_defaults_to_malformed() -> None:
    error = UploadRejected("no reason given")
    assert error.reason == "malformed"
    assert status_for(error) == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_reason_falls_back_to_invalid_argument() -> None:
    assert status_for(UploadRejected("odd", reason="novel")) == grpc.StatusCode.INVALID_ARGUMENT


def test_manifest_error_is_invalid_argument() -> None:
    assert status_for(ManifestError("bad shape")) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("error", [RoundFailed("x"), TransferError("x"), ConfigError("x")])
def test_other_errors_are_internal(error: FedstreamError) -> None:
    assert status_for(error) == grpc.StatusCode.INTERNAL
