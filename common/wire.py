"""Conversions between protobuf messages and fedstream's in-process messages.

The one module (with the servicer and the client's connection) that knows the wire
types; everything it returns is a frozen dataclass. Malformed fields raise
ManifestError, which the transport maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

from fedstream.common import messages as m
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.errors import ManifestError
from fedstream.common.pb import fedstream_pb2 as pb

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


def run_spec_to_pb(spec: m.RunSpec) -> pb.RunSpec:
    return pb.RunSpec(
        model=spec.model,
        dataset=spec.dataset,
        seed=spec.seed,
        test_fraction=spec.test_fraction,
        num_partitions=spec.num_partitions,
        partition=spec.partition,
        dirichlet_alpha=spec.dirichlet_alpha,
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
    )


def round_start_to_pb(task: m.RoundTask) -> pb.ServerMessage:
    c = task.config
    return pb.ServerMessage(
        round_start=pb.RoundStart(
            round=task.round,
            config=pb.RoundConfig(
                local_epochs=c.local_epochs,
                batch_size=c.batch_size,
                learning_rate=c.learning_rate,
                optimizer=c.optimizer,
                momentum=c.momentum,
                weight_decay=c.weight_decay,
                deadline_unix_s=c.deadline_unix_s,
            ),
            manifest=manifest_to_pb(task.manifest),
        )
    )


def round_start_from_pb(message: pb.RoundStart) -> m.RoundTask:
    c = message.config
    return m.RoundTask(
        round=message.round,
        config=m.TrainConfig(
            local_epochs=c.local_epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            optimizer=c.optimizer,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            deadline_unix_s=c.deadline_unix_s,
        ),
        manifest=manifest_from_pb(message.manifest),
    )


def update_header_to_pb(header: m.UpdateHeader) -> pb.UpdateMessage:
    r = header.report
    return pb.UpdateMessage(
        header=pb.UpdateHeader(
            client_id=header.client_id,
            round=header.round,
            num_examples=header.num_examples,
            manifest=manifest_to_pb(header.manifest),
            report=pb.TrainReport(
                train_loss=r.train_loss,
                steps=r.steps,
                train_started_unix_s=r.train_started_unix_s,
                train_finished_unix_s=r.train_finished_unix_s,
                device=r.device,
            ),
        )
    )


def update_header_from_pb(message: pb.UpdateHeader) -> m.UpdateHeader:
    r = message.report
    return m.UpdateHeader(
        client_id=message.client_id,
        round=message.round,
        num_examples=message.num_examples,
        manifest=manifest_from_pb(message.manifest),
        report=m.TrainReport(
            train_loss=r.train_loss,
            steps=r.steps,
            train_started_unix_s=r.train_started_unix_s,
            train_finished_unix_s=r.train_finished_unix_s,
            device=r.device[:64],
        ),
    )
