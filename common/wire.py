"""Conversions between protobuf messages and fedstream's in-process messages.

The one module (with the servicer and the client's connection) that knows the wire
types; everything it returns is a frozen dataclass. Malformed fields raise
ManifestError, which the transport maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from fedstream.common import messages as m
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.errors import ManifestError
from fedstream.common.pb import fedstream_pb2 as pb

T = TypeVar("T")
D = TypeVar("D")
V = TypeVar("V")

MAX_TENSORS = 100_000
MAX_DIMS = 16
# Bounds on the maps a peer sends (config, metrics, task options).
MAX_MAP_ENTRIES = 256
MAX_KEY_CHARS = 128
MAX_TEXT_CHARS = 1024


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
    return pb.RunSpec(
        model=spec.model,
        dataset=spec.dataset,
        seed=spec.seed,
        test_fraction=spec.test_fraction,
        num_partitions=spec.num_partitions,
        partition=spec.partition,
        dirichlet_alpha=spec.dirichlet_alpha,
        task=spec.task,
        task_options=dict(spec.task_options),
        task_fingerprint=spec.task_fingerprint,
    )


def run_spec_from_pb(message: pb.RunSpec) -> m.RunSpec:
    return m.RunSpec(
        model=message.model,
        dataset=message.dataset,
        seed=message.seed,
        test_fraction=message.test_fraction,
        num_partitions=message.num_partitions,
        partition=message.partition,
        dirichlet_alpha=message.dirichlet_alpha,
        task=message.task,
        task_options=_bounded(dict(message.task_options), "task options"),
        task_fingerprint=message.task_fingerprint,
    )


def _bounded(values: dict[str, V], what: str) -> dict[str, V]:
    if len(values) > MAX_MAP_ENTRIES:
        raise ManifestError(f"{what}: {len(values)} entries (max {MAX_MAP_ENTRIES})")
    for key, value in values.items():
        if not key or len(key) > MAX_KEY_CHARS:
            raise ManifestError(f"{what}: a key of {len(key)} characters (1..{MAX_KEY_CHARS})")
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ManifestError(f"{what}: {key!r} holds {len(value)} characters")
    return values


def scalar_to_pb(value: m.Scalar) -> pb.Scalar:
    # bool before int: True is an int in Python.
    if isinstance(value, bool):
        return pb.Scalar(flag=value)
    if isinstance(value, int):
        return pb.Scalar(integer=value)
    if isinstance(value, float):
        return pb.Scalar(number=value)
    return pb.Scalar(text=str(value))


def scalar_from_pb(message: pb.Scalar) -> m.Scalar:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise ManifestError("a config value holds nothing")
    value: m.Scalar = getattr(message, kind)
    return value


def round_start_to_pb(plan: m.RoundPlan) -> pb.ServerMessage:
    return pb.ServerMessage(
        round_start=pb.RoundStart(
            round=plan.round,
            plan_id=plan.plan_id,
            kind=_PLAN_KINDS[plan.kind],
            config={key: scalar_to_pb(value) for key, value in plan.config.items()},
            deadline_unix_s=plan.deadline_unix_s,
            manifest=manifest_to_pb(plan.manifest),
        )
    )


def round_start_from_pb(message: pb.RoundStart) -> m.RoundPlan:
    kinds = {value: kind for kind, value in _PLAN_KINDS.items()}
    if message.kind not in kinds:
        raise ManifestError(f"round {message.round}: unknown plan kind {message.kind}")
    if not message.plan_id or len(message.plan_id) > MAX_KEY_CHARS:
        raise ManifestError(f"round {message.round}: a plan id of {len(message.plan_id)} chars")
    config = {key: scalar_from_pb(value) for key, value in message.config.items()}
    return m.RoundPlan(
        round=message.round,
        plan_id=message.plan_id,
        kind=kinds[message.kind],
        config=_bounded(config, f"round {message.round} config"),
        deadline_unix_s=message.deadline_unix_s,
        manifest=manifest_from_pb(message.manifest),
    )


def _metrics_from_pb(values: Mapping[str, float], what: str) -> dict[str, float]:
    return _bounded({key: float(value) for key, value in values.items()}, what)


def update_header_to_pb(header: m.UpdateHeader) -> pb.UpdateMessage:
    return pb.UpdateMessage(
        header=pb.UpdateHeader(
            client_id=header.client_id,
            round=header.round,
            num_examples=header.num_examples,
            manifest=manifest_to_pb(header.manifest),
            report=_fields_to_pb(header.report, pb.TrainReport),
            plan_id=header.plan_id,
            metrics=dict(header.metrics),
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
        plan_id=message.plan_id,
        metrics=_metrics_from_pb(message.metrics, f"client {message.client_id!r} metrics"),
    )


def evaluation_to_pb(result: m.EvaluationResult) -> pb.EvaluationResult:
    return pb.EvaluationResult(
        client_id=result.client_id,
        round=result.round,
        plan_id=result.plan_id,
        num_examples=result.num_examples,
        metrics=dict(result.metrics),
    )


def evaluation_from_pb(message: pb.EvaluationResult) -> m.EvaluationResult:
    return m.EvaluationResult(
        client_id=message.client_id,
        round=message.round,
        plan_id=message.plan_id,
        num_examples=message.num_examples,
        metrics=_metrics_from_pb(message.metrics, f"client {message.client_id!r} metrics"),
    )


def failure_to_pb(report: m.FailureReport) -> pb.FailureReport:
    return _fields_to_pb(report, pb.FailureReport)


def failure_from_pb(message: pb.FailureReport) -> m.FailureReport:
    report = _fields_from_pb(message, m.FailureReport)
    # One line of bounded length: it goes into the server's log and metrics.
    reason = " ".join(report.reason.split())[:MAX_TEXT_CHARS]
    return dataclasses.replace(report, reason=reason)


_PLAN_KINDS = {m.PlanKind.TRAIN: pb.PLAN_TRAIN, m.PlanKind.EVALUATE: pb.PLAN_EVALUATE}


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
