"""The end of a run: clients told to finish stop counting as connected.

``fl-server`` drains at shutdown until every client that joined has been told the run
is over, up to a grace period: a normal run ends at once, and a client that was
restarting when the last round ended still gets its Finish when it reconnects.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.integration.conftest import FakeClient, Harness, stream, tiny_state, upload_messages
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
    await asyncio.wait_for(harness.coordinator.wait_all_told(), 2)
    assert harness.coordinator.connected_clients() == []


async def test_shutdown_waits_for_a_known_client_that_reconnects_late(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=1)
    (client,) = await connect(harness, "a")
    late = FakeClient(harness.stub(), "late")
    await late.join()  # joined during the run, but restarting when the run ends
    run = asyncio.create_task(harness.coordinator.run())
    await client.receive_round()
    await client.stub.PushUpdate(stream(upload_messages("a", 1, delta_like(tiny_state(), 1.0))))
    await asyncio.wait_for(run, 20)
    assert (await client.watch.read()).WhichOneof("kind") == "finish"
    waiting = asyncio.create_task(harness.coordinator.wait_all_told())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiting), 0.5)
    await late.start_watch()
    assert (await late.watch.read()).WhichOneof("kind") == "finish"
    await asyncio.wait_for(waiting, 5)
