"""A client for B1/B2 built from fedstream's real client code, minus training.

It is ``fedstream.client.connection.ServerConnection`` itself (join, the WatchRounds
stream decoded by ``PayloadAssembler`` with its CRC and finiteness checks, ``push_update``
encoding and chunking the delta), driven without a trainer: the delta it uploads is the
model it just received, so nothing extra is allocated. The only addition is a pass-through
wrapper around the WatchRounds call that notes when each round's first message arrives.

Run as ``python -m benchmarks.transport_client --server HOST:PORT --client-id ID``; for
every round it prints a ``downloaded`` event, waits for ``go`` on stdin (so that all K
clients upload together), uploads and prints ``uploaded``. The upload call returns once
the server has validated the delta and folded it into the round's sum.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from fedstream.client.connection import FinishEvent, ServerConnection
from fedstream.client.settings import ClientSettings
from fedstream.client.trainer import LocalUpdate
from fedstream.common.codec import Manifest
from fedstream.common.messages import TrainReport

from benchmarks.bare_grpc import emit, wait_go
from benchmarks.models import DEFAULT_TENSOR_BYTES, SyntheticModel, block_sizes

# The server of B1/B2 runs on digits: 1x8x8 images, 10 classes.
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


class RoundClock:
    """Pass-through wrapper of the WatchRounds call that records each RoundStart's arrival."""

    def __init__(self, watch: Callable[..., Any]) -> None:
        self._watch = watch
        self.round_started = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return self._timed(self._watch(*args, **kwargs))

    async def _timed(self, call: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for message in call:
            if message.WhichOneof("kind") == "round_start":
                self.round_started = time.monotonic()
            yield message


def expected_manifest(model_bytes: int) -> Manifest:
    """The server's synthetic digits model, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        state = SyntheticModel(DIGITS_SHAPE, DIGITS_CLASSES,
                               block_sizes(model_bytes, DEFAULT_TENSOR_BYTES)).state_dict()
    return Manifest.of(state)


async def run(address: str, client_id: str, chunk_bytes: int, model_bytes: int) -> None:
    settings = ClientSettings(
        server=address, client_id=client_id, chunk_size_bytes=chunk_bytes, connect_timeout_s=120
    )
    connection = ServerConnection(settings, client_id)
    clock = RoundClock(connection.stub.WatchRounds)
    connection.stub.WatchRounds = clock
    try:
        await connection.join()
        async for event in connection.rounds(expected_manifest(model_bytes)):
            if isinstance(event, FinishEvent):
                return
            task = event.plan
            size = task.manifest.total_bytes
            emit("downloaded", round=task.round, t0=clock.round_started, t1=time.monotonic(),
                 bytes=size)
            await wait_go()
            started = time.monotonic()
            now = time.time()
            report = TrainReport(0, now, now, "cpu")
            await connection.push_update(
                LocalUpdate(task.round, task.plan_id, event.global_state, 1, {}, report)
            )
            emit("uploaded", round=task.round, t0=started, t1=time.monotonic(), bytes=size)
    finally:
        await connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport_client")
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--model-bytes", type=int, required=True,
                        help="size of the server's synthetic model (its manifest is checked)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.server, args.client_id, args.chunk_bytes, args.model_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
