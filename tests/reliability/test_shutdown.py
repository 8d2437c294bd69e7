"""The end of a run: clients told to finish stop counting as connected.

``fl-server`` drains at shutdown until no client holds a round stream, up to a grace
period. That wait ends early only if a stream closed after Finish marks its session
gone; otherwise every shutdown waits out the whole grace period.
"""

from __future__ import annotations

import asyncio

import grpc

from tests.integration.conftest import Harness, stream, tiny_state, upload_messages
from tests.integration.test_rounds import connect, delta_like
from tests.reliability.conftest import MakeHarness


async def test_clients_that_received_finish_are_no_longer_connected(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=1)
    (client,) = await connect(harness, "a")
    run = asyncio.create_task(harness.coordinator.run())
    round_number, _, state = await client.receive_round()
    await client.stub.PushUpdate(
        stream(upload_messages("a", round_number, delta_like(tiny_state(), 1.0)))
    )
    await asyncio.wait_for(run, 20)
    assert client.watch is not None
    finish = await client.watch.read()
    assert finish.WhichOneof("kind") == "finish"
    assert await client.watch.read() is grpc.aio.EOF  # the server closed the stream
    await asyncio.wait_for(harness.coordinator.wait_all_detached(), 2)
    assert harness.coordinator.connected_clients() == []
