"""An in-process fedstream server on port 0, spoken to through real gRPC stubs."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from fedstream.common import wire
from fedstream.common.codec import Manifest, decode, iter_payload
from fedstream.common.messages import (
    CREDENTIAL_METADATA_KEY,
    PROTOCOL_VERSION,
    RoundPlan,
    RunSpec,
    TrainReport,
)
from fedstream.common.messages import UpdateHeader as Header
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.common.pb import fedstream_pb2_grpc as pb_grpc
from fedstream.server.auth import TokenTable
from fedstream.server.coordinator import Coordinator, CoordinatorConfig, RoundSummary
from fedstream.server.main import start_server


def tiny_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    }


def make_config(**overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = {
        "rounds": 1,
        "min_clients": 2,
        "clients_per_round": 0,
        "round_timeout_s": 20.0,
        "join_timeout_s": 20.0,
        "round_retries": 0,
        "server_lr": 1.0,
        "chunk_size_bytes": 16,  # tiny chunks: every transfer spans many messages
        "spool_memory_bytes": 1 << 20,
        "spool_dir": None,
        "seed": 0,
        "round_config": {"local_epochs": 1, "batch_size": 8, "learning_rate": 0.1},
        "run": RunSpec("cnn", "digits", 0, 0.2, 2, "iid", 0.5),
    }
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


class _Credential:
    """What a real client does with its credential, for hand-driven stubs: keep the one a
    Join returns and present it on every later call of this channel."""

    def __init__(self) -> None:
        self.secret: str | None = None

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self.secret is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(CREDENTIAL_METADATA_KEY, self.secret)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined, no-any-return]


# grpc.aio files each interceptor under one call type only, hence one class per type.
class _KeepCredential(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, credential: _Credential) -> None:
        self.credential = credential

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        call = await continuation(self.credential.details(details), request)
        reply = await call
        if isinstance(reply, pb.JoinReply) and reply.credential:
            self.credential.secret = reply.credential
        return call


class _PresentOnWatch(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, credential: _Credential) -> None:
        self.credential = credential

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self.credential.details(details), request)


class _PresentOnUpload(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, credential: _Credential) -> None:
        self.credential = credential

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self.credential.details(details), request_iterator)


def credential_interceptors() -> list[grpc.aio.ClientInterceptor]:
    credential = _Credential()
    return [_KeepCredential(credential), _PresentOnWatch(credential), _PresentOnUpload(credential)]


# Coordinators of the running test, so hand-made uploads can name the open plan of a
# round the way a real client copies it from the RoundStart it received.
_LIVE: list[Coordinator] = []


def open_plan_id(round_number: int) -> str:
    """The plan id of the open attempt of ``round_number`` ("" when there is none)."""
    for coordinator in _LIVE:
        state = coordinator.current
        if state is not None and state.number == round_number:
            return state.plan_id
    return ""


@dataclass
class Harness:
    coordinator: Coordinator
    server: grpc.aio.Server
    address: str
    rounds: list[RoundSummary] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self) -> pb_grpc.FederationStub:
        """A stub on its own channel that keeps and presents its Join's credential."""
        channel = grpc.aio.insecure_channel(self.address, interceptors=credential_interceptors())
        self.channels.append(channel)
        return pb_grpc.FederationStub(channel)


@pytest.fixture
async def make_harness() -> AsyncIterator[object]:
    made: list[Harness] = []

    async def factory(tokens: TokenTable | None = None, **overrides: object) -> Harness:
        rounds: list[RoundSummary] = []
        coordinator = Coordinator(
            make_config(**overrides),
            tiny_state(),
            evaluate=lambda state: None,
            on_round=lambda summary, state: rounds.append(summary),
        )
        _LIVE.append(coordinator)
        server, port, _ = await start_server(coordinator, "127.0.0.1", 0, tokens=tokens)
        harness = Harness(coordinator, server, f"127.0.0.1:{port}", rounds)
        made.append(harness)
        return harness

    yield factory
    _LIVE.clear()
    for harness in made:
        for channel in harness.channels:
            await channel.close()
        await harness.server.stop(None)


class FakeClient:
    """A client that speaks the real protocol by hand (no training): tests drive each step."""

    def __init__(self, stub: pb_grpc.FederationStub, client_id: str) -> None:
        self.stub = stub
        self.client_id = client_id
        self.watch: grpc.aio.UnaryStreamCall | None = None
        self.plan: RoundPlan | None = None  # the last RoundStart received
        self.secret: str | None = None  # this id's credential (its stub presents it too)

    async def join(self) -> pb.JoinReply:
        reply: pb.JoinReply = await self.stub.Join(
            pb.JoinRequest(client_id=self.client_id, protocol_version=PROTOCOL_VERSION)
        )
        self.secret = reply.credential or self.secret
        return reply

    def credential_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata proving this client's id, for calls made outside its own stub."""
        assert self.secret is not None, "join first"
        return ((CREDENTIAL_METADATA_KEY, self.secret),)

    async def start_watch(self) -> None:
        self.watch = self.stub.WatchRounds(pb.WatchRequest(client_id=self.client_id))

    async def receive_round(self) -> tuple[int, Manifest, dict[str, torch.Tensor]]:
        """Read one RoundStart + chunks + TransferEnd from the watch stream."""
        assert self.watch is not None
        start = await self.watch.read()
        assert start.WhichOneof("kind") == "round_start", start
        task = wire.round_start_from_pb(start.round_start)
        self.plan = task
        payload = bytearray()
        while True:
            message = await self.watch.read()
            kind = message.WhichOneof("kind")
            if kind == "chunk":
                payload += message.chunk.data
            else:
                assert kind == "end"
                assert message.end.crc32 == zlib.crc32(payload)
                break
        return task.round, task.manifest, decode(bytes(payload), task.manifest)


def header_message(
    client_id: str, round_number: int, manifest: Manifest, num_examples: int = 10
) -> pb.UpdateMessage:
    report = TrainReport(1, 0.0, 0.0, "cpu")
    header = Header(client_id, round_number, num_examples, manifest, report,
                    plan_id=open_plan_id(round_number), metrics={"loss": 0.5})
    return wire.update_header_to_pb(header)


def upload_messages(
    client_id: str,
    round_number: int,
    delta: Mapping[str, torch.Tensor],
    num_examples: int = 10,
    chunk_bytes: int = 16,
) -> list[pb.UpdateMessage]:
    manifest = Manifest.of(delta)
    messages = [header_message(client_id, round_number, manifest, num_examples)]
    crc, total = 0, 0
    for chunk in iter_payload(delta, manifest, chunk_bytes):
        crc = zlib.crc32(chunk, crc)
        total += len(chunk)
        messages.append(pb.UpdateMessage(chunk=pb.Chunk(data=chunk)))
    messages.append(pb.UpdateMessage(end=pb.TransferEnd(total_bytes=total, crc32=crc)))
    return messages


def stream(messages: list[pb.UpdateMessage]) -> Iterator[pb.UpdateMessage]:
    yield from messages


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    """Await a condition on coordinator state that another coroutine will make true."""
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
