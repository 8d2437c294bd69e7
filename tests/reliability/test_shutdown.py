"""The end of a run: clients told to finish stop counting as connected.

``fl-server`` drains at shutdown until every client that joined has been told the run
is over, up to a grace period: a normal run ends at once, and a client that was
restarting when the last round ended still gets its Finish when it reconnects. A server
stopped before the run is complete says so (Finish kind SERVER_STOPPING), and its
clients wait for it within --connect-timeout, whatever they were doing (real processes).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import FakeClient, Harness, stream, tiny_state, upload_messages
from tests.integration.test_rounds import connect, delta_like
from tests.procs import Cluster, start_fl_server
from tests.reliability.conftest import MakeHarness
from tests.reliability.federation import SERVER_FLAGS, start_client


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


# How to catch the client in each phase: the server's flags, and the line that shows it.
PHASES = {
    # The server waits for a second client that never comes: the client sits idle.
    "idle": (("--min-clients", "2"), r"client waiter is waiting for rounds"),
    # Many local epochs: the client is still training when the server stops.
    "training": (("--min-clients", "1", "--local-epochs", "40"), r"received global model"),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_a_server_stopped_early_is_waited_for_and_rejoined(
    cluster: Cluster, tmp_path: Path, phase: str
) -> None:
    flags, cue = PHASES[phase]
    out = tmp_path / "run"
    first, port = start_fl_server(cluster, out, "--rounds", "1", *flags, *SERVER_FLAGS)
    client = start_client(cluster, "client", f"127.0.0.1:{port}", "waiter")
    (client if phase == "training" else first).wait_for(cue)
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130, first.output()
    second, _ = start_fl_server(
        cluster, out, "--rounds", "1", "--min-clients", "1", *SERVER_FLAGS,
        port=port, name="second",
    )  # fmt: skip
    assert second.wait(timeout=120) == 0, second.output()
    assert client.wait(timeout=60) == 0, client.output()
    assert "server finished the run: run complete" in client.output()
    second.wait_for(r"client waiter joined")


def test_a_server_that_never_comes_back_ends_its_clients_with_status_1(
    cluster: Cluster, tmp_path: Path
) -> None:
    server, port = start_fl_server(
        cluster, tmp_path / "run", "--rounds", "1", "--min-clients", "2", *SERVER_FLAGS
    )
    client = start_client(
        cluster, "client", f"127.0.0.1:{port}", "waiter", "--connect-timeout", "3"
    )
    server.wait_for(r"client waiter is waiting for rounds")
    server.signal(signal.SIGTERM)
    assert client.wait(timeout=60) == 1, client.output()
    client.wait_for(r"server stopping before the run is complete")
    client.wait_for(r"unreachable for 3s; giving up")
