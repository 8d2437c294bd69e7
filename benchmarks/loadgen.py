"""Load generator: many lightweight clients speaking fedstream's real protocol.

One OS process per client is too heavy for hundreds of clients (each would import
torch), so one loadgen process runs many simulated clients on one event loop. Each has its
own gRPC channel and TCP connection (a local subchannel pool, so channels are not shared)
and does what ``fl-client`` does on the wire: ``Join``, ``WatchRounds``, and for every
round a ``PushUpdate`` of header, chunks and trailer. It trains nothing and keeps nothing:
downloaded chunks are counted and CRC-checked as they arrive, then dropped, and the
upload is a precomputed delta (all-zero bytes, valid for any manifest: zero floats are
finite and the padding between tensors must be zero anyway) whose chunk messages are
serialised once per process and shared by every simulated client. That keeps client-side
memory near zero even for a model larger than 2 GiB, so the server's memory and time are
what the benchmark sees.

Run as ``python -m benchmarks.loadgen --server HOST:PORT --clients N --prefix ID``; it
prints one ``result`` event holding every client's round timings when the server
finishes the run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from fedstream.common.pb import fedstream_pb2 as pb

from benchmarks.bare_grpc import emit

SERVICE = "/fedstream.v1.Federation"
PROTOCOL_VERSION = 2
# As in fedstream.common.messages, which is not imported here: it would pull in torch.
CREDENTIAL_METADATA_KEY = "fedstream-credential"
MAX_MESSAGE_BYTES = 4 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per simulated client
]


class ZeroDelta:
    """The serialised chunk messages of an all-zero delta, built once per payload size."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._messages: dict[int, bytes] = {}
        self._crcs: dict[int, int] = {}

    def _message(self, length: int) -> bytes:
        if length not in self._messages:
            chunk = pb.UpdateMessage(chunk=pb.Chunk(data=bytes(length)))
            self._messages[length] = chunk.SerializeToString()
        return self._messages[length]

    def crc(self, total_bytes: int) -> int:
        if total_bytes not in self._crcs:
            full, rest = divmod(total_bytes, self.chunk_bytes)
            zeros, crc = bytes(self.chunk_bytes), 0
            for _ in range(full):
                crc = zlib.crc32(zeros, crc)
            self._crcs[total_bytes] = zlib.crc32(bytes(rest), crc)
        return self._crcs[total_bytes]

    def chunks(self, total_bytes: int) -> list[tuple[bytes, int]]:
        """(serialised message, repeat count) pairs covering ``total_bytes``."""
        full, rest = divmod(total_bytes, self.chunk_bytes)
        runs = [(self._message(self.chunk_bytes), full)] if full else []
        return runs + ([(self._message(rest), 1)] if rest else [])


@dataclass
class RoundTiming:
    round: int
    started: float  # RoundStart arrived
    downloaded: float  # TransferEnd arrived and the CRC matched
    uploaded: float  # the server accepted the upload (validated and folded)


@dataclass
class SimClient:
    client_id: str
    rounds: list[RoundTiming] = field(default_factory=list)
    error: str = ""


async def _upload(push: grpc.aio.StreamUnaryMultiCallable, header: bytes, delta: ZeroDelta,
                  total_bytes: int, proof: tuple[tuple[str, str], ...]) -> None:
    async def messages() -> AsyncIterator[bytes]:
        yield header
        for message, count in delta.chunks(total_bytes):
            for _ in range(count):
                yield message
        end = pb.UpdateMessage(end=pb.TransferEnd(total_bytes=total_bytes,
                                                  crc32=delta.crc(total_bytes)))
        yield end.SerializeToString()

    await push(messages(), wait_for_ready=True, metadata=proof)


async def simulate(address: str, client: SimClient, delta: ZeroDelta) -> None:
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        join = channel.unary_unary(f"{SERVICE}/Join",
                                   request_serializer=pb.JoinRequest.SerializeToString,
                                   response_deserializer=pb.JoinReply.FromString)
        watch = channel.unary_stream(f"{SERVICE}/WatchRounds",
                                     request_serializer=pb.WatchRequest.SerializeToString,
                                     response_deserializer=pb.ServerMessage.FromString)
        push = channel.stream_unary(f"{SERVICE}/PushUpdate",
                                    request_serializer=None,  # requests are serialised bytes
                                    response_deserializer=pb.UpdateReply.FromString)
        joined = await join(pb.JoinRequest(client_id=client.client_id,
                                           protocol_version=PROTOCOL_VERSION),
                            wait_for_ready=True, timeout=300)
        # Every call after Join proves the client id with the credential Join returned.
        proof = ((CREDENTIAL_METADATA_KEY, joined.credential),)
        start: pb.RoundStart | None = None
        started, crc, received = 0.0, 0, 0
        async for message in watch(pb.WatchRequest(client_id=client.client_id), metadata=proof):
            kind = message.WhichOneof("kind")
            if kind == "round_start":
                start, started, crc, received = message.round_start, time.monotonic(), 0, 0
            elif kind == "chunk":
                data = message.chunk.data
                crc = zlib.crc32(data, crc)
                received += len(data)
            elif kind == "end":
                if start is None or received != message.end.total_bytes:
                    raise RuntimeError(f"{client.client_id}: {received} bytes, trailer "
                                       f"{message.end.total_bytes}")
                if crc != message.end.crc32:
                    raise RuntimeError(f"{client.client_id}: model checksum mismatch")
                downloaded = time.monotonic()
                now = time.time()
                header = pb.UpdateMessage(header=pb.UpdateHeader(
                    client_id=client.client_id, round=start.round, num_examples=1,
                    manifest=start.manifest, plan_id=start.plan_id,
                    report=pb.TrainReport(train_started_unix_s=now, train_finished_unix_s=now,
                                          device="loadgen"),
                ))
                await _upload(push, header.SerializeToString(), delta, received, proof)
                client.rounds.append(
                    RoundTiming(start.round, started, downloaded, time.monotonic())
                )
                start = None
            elif kind == "finish":
                return


async def _guarded(address: str, client: SimClient, delta: ZeroDelta) -> None:
    try:
        await simulate(address, client, delta)
    except (grpc.aio.AioRpcError, RuntimeError) as error:
        client.error = str(error)[:300]


async def run(address: str, count: int, prefix: str, chunk_bytes: int) -> list[SimClient]:
    delta = ZeroDelta(chunk_bytes)
    clients = [SimClient(f"{prefix}-{i}") for i in range(count)]
    async with asyncio.TaskGroup() as group:
        for client in clients:
            group.create_task(_guarded(address, client, delta))
    return clients


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--server", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--prefix", default="load")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    clients = asyncio.run(run(args.server, args.clients, args.prefix, args.chunk_bytes))
    emit("result", clients=[
        {"id": c.client_id, "error": c.error,
         "rounds": [[t.round, t.started, t.downloaded, t.uploaded] for t in c.rounds]}
        for c in clients
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
