"""The limit for B1 and B2: a bare gRPC byte stream between processes on this machine.

No codec, no protobuf, no framework: generic ``grpc.aio`` handlers with identity
serializers stream one preallocated chunk of ``chunk_bytes`` over and over, and the
receiver only counts bytes. The server and each client are separate processes, the
channel options and chunk size are fedstream's, so the only differences from a real
round are what fedstream itself does per chunk.

Run as ``python -m benchmarks.bare_grpc serve`` or ``... client``; each prints JSON events
on stdout and, as a client, waits for a ``go`` line on stdin before each direction so
that all K clients start together (a barrier kept by the parent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence

import grpc

SERVICE = "fedstream.bench.Bare"
MAX_MESSAGE_BYTES = 4 << 20  # fedstream's limit on both ends
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def wait_go() -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go' on stdin, got {line!r}")


def _counts(total_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    return divmod(total_bytes, chunk_bytes)


async def serve(chunk_bytes: int) -> None:
    chunk = bytes(chunk_bytes)

    async def download(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        full, rest = _counts(int.from_bytes(request, "little"), chunk_bytes)
        for _ in range(full):
            yield chunk
        if rest:
            yield chunk[:rest]

    async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        received = 0
        async for data in requests:
            received += len(data)
        return received.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    emit("listening", port=port)
    await server.wait_for_termination()


async def client(address: str, total_bytes: int, chunk_bytes: int) -> None:
    chunk = bytes(chunk_bytes)
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        await channel.channel_ready()
        download = channel.unary_stream(f"/{SERVICE}/Download")
        upload = channel.stream_unary(f"/{SERVICE}/Upload")
        emit("ready")

        await wait_go()
        started, received = time.monotonic(), 0
        async for data in download(total_bytes.to_bytes(8, "little")):
            received += len(data)
        emit("downloaded", t0=started, t1=time.monotonic(), bytes=received)

        async def chunks() -> AsyncIterator[bytes]:
            full, rest = _counts(total_bytes, chunk_bytes)
            for _ in range(full):
                yield chunk
            if rest:
                yield chunk[:rest]

        await wait_go()
        started = time.monotonic()
        reply = await upload(chunks())
        emit("uploaded", t0=started, t1=time.monotonic(), bytes=int.from_bytes(reply, "little"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_grpc")
    parser.add_argument("role", choices=["serve", "client"])
    parser.add_argument("--server", default="")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    if args.role == "serve":
        asyncio.run(serve(args.chunk_bytes))
    else:
        asyncio.run(client(args.server, args.bytes, args.chunk_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
