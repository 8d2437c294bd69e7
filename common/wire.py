"""Conversions between protobuf messages and fedstream's in-process messages.

The one module (with the servicer and the client's connection) that knows the wire
types; everything it returns is a frozen dataclass. Malformed fields raise
ManifestError, which the transport maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fedstream.common import messages as m
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.errors import ManifestError
from fedstream.common.pb import fedstream_pb2 as pb

T = TypeVar("T")
D = TypeVar("D")

MAX_TENSORS = 100_000
MAX_DIMS = 16


def manifest_to_pb(manifest: Manifest) -> pb.Manifest:
    return pb.Manifest(
        tensors=[
            pb.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in manifest.specs
        ],
        total_bytes=manifest.total_bytes,
    )


def manifest_from_pb(message: pb.Manifest) -> Manifest:
    if len(message.tensors) > MAX_TENSORS:
        raise ManifestError(f"manifest lists {len(message.tensors)} tensors (max {MAX_TENSORS})")
    specs = []
    for tensor in message.tensors:
        if len(tensor.shape) > MAX_DIMS:
            raise ManifestError(f"tensor {tensor.name!r} has {len(tensor.shape)} dimensions")
        specs.append(TensorSpec(tensor.name, tensor.dtype, tuple(int(d) for d in tensor.shape)))
    manifest = Manifest(tuple(specs))
    if manifest.total_bytes != message.total_bytes:
        raise ManifestError(
            f"manifest declares {message.total_bytes} bytes, its tensors need "
            f"{manifest.total_bytes}"
        )
    return manifest


def _fields_to_pb(value: Any, message_type: type[T]) -> T:
    """A protobuf message with the same-named fields as the flat dataclass ``value``."""
    return message_type(**dataclasses.asdict(value))


def _fields_from_pb(message: Any, value_type: type[D]) -> D:
    """A flat dataclass built from the same-named fields of a protobuf message."""
    return value_type(**{f.name: getattr(message, f.name) for f in dataclasses.fields(value_type)})  # type: ignore[arg-type]


def run_spec_to_pb(spec: m.RunSpec) -> pb.RunSpec:
    return _fields_to_pb(spec, pb.RunSpec)


def run_spec_from_pb(message: pb.RunSpec) -> m.RunSpec:
    return _fields_from_pb(message, m.RunSpec)


def round_start_to_pb(task: m.RoundTask) -> pb.ServerMessage:
    return pb.ServerMessage(
        round_start=pb.RoundStart(
            round=task.round,
            config=_fields_to_pb(task.config, pb.RoundConfig),
            manifest=manifest_to_pb(task.manifest),
        )
    )


def round_start_from_pb(message: pb.RoundStart) -> m.RoundTask:
    return m.RoundTask(
        round=message.round,
        config=_fields_from_pb(message.config, m.TrainConfig),
        manifest=manifest_from_pb(message.manifest),
    )


def update_header_to_pb(header: m.UpdateHeader) -> pb.UpdateMessage:
    return pb.UpdateMessage(
        header=pb.UpdateHeader(
            client_id=header.client_id,
            round=header.round,
            num_examples=header.num_examples,
            manifest=manifest_to_pb(header.manifest),
            report=_fields_to_pb(header.report, pb.TrainReport),
        )
    )


def update_header_from_pb(message: pb.UpdateHeader) -> m.UpdateHeader:
    report = _fields_from_pb(message.report, m.TrainReport)
    return m.UpdateHeader(
        client_id=message.client_id,
        round=message.round,
        num_examples=message.num_examples,
        manifest=manifest_from_pb(message.manifest),
        report=dataclasses.replace(report, device=report.device[:64]),
    )


_FINISH_KINDS = {
    m.FinishKind.RUN_COMPLETE: pb.FINISH_RUN_COMPLETE,
    m.FinishKind.SERVER_STOPPING: pb.FINISH_SERVER_STOPPING,
    m.FinishKind.REPLACED: pb.FINISH_REPLACED,
}


def finish_to_pb(reason: str, kind: m.FinishKind) -> pb.ServerMessage:
    return pb.ServerMessage(finish=pb.Finish(reason=reason, kind=_FINISH_KINDS[kind]))


def finish_kind_from_pb(message: pb.Finish) -> m.FinishKind:
    """UNSPECIFIED (a server older than the field) and unknown values mean what Finish
    always meant before: the run is complete."""
    for kind, value in _FINISH_KINDS.items():
        if message.kind == value:
            return kind
    return m.FinishKind.RUN_COMPLETE
