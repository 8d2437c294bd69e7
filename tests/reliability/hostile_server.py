"""A scripted fedstream server for testing the client against a broken or hostile peer.

It speaks the real protocol through the generated stubs (``fedstream.common.pb``), on
an in-process ``grpc.aio`` server on port 0, but every WatchRounds stream plays a
script the test chose: a manifest that lies, a checksum that is wrong, chunks that
never end. It accepts every Join and every upload, and records when each call came,
so tests can see how often, and how fast, a client came back.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch
from fedstream.common import wire
from fedstream.common.codec import Manifest, iter_payload
from fedstream.common.data import load_dataset
from fedstream.common.models import build_model
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.common.pb import fedstream_pb2_grpc as pb_grpc

RUN = pb.RunSpec(
    model="cnn",
    dataset="digits",
    seed=0,
    test_fraction=0.2,
    num_partitions=1,
    partition="iid",
    dirichlet_alpha=0.5,
    task="classification",
)
CONFIG = {
    "local_epochs": pb.Scalar(integer=1),
    "batch_size": pb.Scalar(integer=32),
    "learning_rate": pb.Scalar(number=0.05),
    "optimizer": pb.Scalar(text="sgd"),
    "momentum": pb.Scalar(number=0.0),
}

# One stream's messages; the argument is the 0-based index of this WatchRounds call. The
# stream closes when the script returns; a script that means to idle awaits ``idle()``.
Script = Callable[[int], AsyncIterator[pb.ServerMessage]]


async def idle() -> None:
    """Keep a stream open and silent, as a server between rounds does."""
    await asyncio.Event().wait()


def real_state() -> dict[str, torch.Tensor]:
    """The global state an honest server would send for RUN: the tensors of the client's
    own model that travel (every floating-point one)."""
    data = load_dataset(RUN.dataset, "data", False, RUN.seed, RUN.test_fraction)
    model = build_model(RUN.model, data.input_shape, data.num_classes, RUN.seed)
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def round_start(manifest: pb.Manifest, round_number: int = 1) -> pb.ServerMessage:
    return pb.ServerMessage(
        round_start=pb.RoundStart(
            round=round_number,
            plan_id=f"plan-{round_number}",
            kind=pb.PLAN_TRAIN,
            config=CONFIG,
            deadline_unix_s=time.time() + 300,
            manifest=manifest,
        )
    )


def honest_transfer(
    state: dict[str, torch.Tensor], round_number: int = 1, crc_xor: int = 0
) -> Iterator[pb.ServerMessage]:
    """RoundStart, the payload in 64 KiB chunks, TransferEnd (``crc_xor`` spoils the CRC)."""
    manifest = Manifest.of(state)
    yield round_start(wire.manifest_to_pb(manifest), round_number)
    crc = 0
    for chunk in iter_payload(state, manifest, 64 << 10):
        crc = zlib.crc32(chunk, crc)
        yield pb.ServerMessage(chunk=pb.Chunk(data=chunk))
    end = pb.TransferEnd(total_bytes=manifest.total_bytes, crc32=crc ^ crc_xor)
    yield pb.ServerMessage(end=end)


def finish(reason: str = "run complete") -> pb.ServerMessage:
    return pb.ServerMessage(finish=pb.Finish(reason=reason))


@dataclass
class Calls:
    """When each RPC arrived (time.monotonic()), and what each stream managed to send."""

    joins: list[float] = field(default_factory=list)
    watches: list[float] = field(default_factory=list)
    uploads: list[int] = field(default_factory=list)  # round of each upload
    sent_bytes: list[int] = field(default_factory=list)  # chunk bytes yielded per stream


class HostileServicer(pb_grpc.FederationServicer):  # type: ignore[misc]
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = Calls()

    async def Join(  # noqa: N802 - gRPC method name
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        self.calls.joins.append(time.monotonic())
        return pb.JoinReply(client_id=request.client_id, run=RUN, partition_index=0)

    async def WatchRounds(  # noqa: N802
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        index = len(self.calls.watches)
        self.calls.watches.append(time.monotonic())
        self.calls.sent_bytes.append(0)
        async for message in self.script(index):
            if message.WhichOneof("kind") == "chunk":
                self.calls.sent_bytes[index] += len(message.chunk.data)
            yield message

    async def PushUpdate(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpdateMessage], context: grpc.aio.ServicerContext
    ) -> pb.UpdateReply:
        round_number = 0
        async for message in request_iterator:
            if message.WhichOneof("kind") == "header":
                round_number = message.header.round
        self.calls.uploads.append(round_number)
        return pb.UpdateReply(round=round_number)


async def start_hostile_server(script: Script) -> tuple[grpc.aio.Server, HostileServicer, int]:
    server = grpc.aio.server()
    servicer = HostileServicer(script)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port
