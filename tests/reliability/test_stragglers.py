"""Stragglers: a client slower than the round deadline is dropped from that round, its
late upload is refused as stale (FAILED_PRECONDITION) without touching the model, and
it takes part again in the next round.

The end-to-end test makes the straggler late by pausing its process (SIGSTOP) right
after it receives the model, and resuming it (SIGCONT) once the server has closed the
round. A client made slow by more local epochs is late or on time depending on how
loaded the machine is; a paused process is late by construction, and is itself a real
straggler (a preempted or swapping host). The integration tests pin the same rule down
to the message: an upload begun in time but finished after the deadline, and one begun
after it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.server.upload import UploadReceiver

from tests.integration.conftest import Harness, stream, tiny_state, upload_messages, wait_until
from tests.integration.test_rounds import connect, delta_like
from tests.procs import Cluster
from tests.reliability.conftest import MakeHarness
from tests.reliability.federation import (
    check_history,
    clients_of,
    start_client,
    start_reliability_server,
)

ROUND_TIMEOUT_S = 8


@pytest.mark.e2e
def test_paused_client_misses_the_deadline_is_refused_and_rejoins(
    cluster: Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    rounds = 4
    server, port = start_reliability_server(cluster, out, rounds, ROUND_TIMEOUT_S)
    address = f"127.0.0.1:{port}"
    # Three local epochs keep the straggler inside its training long enough for the
    # pause to land there; the fast clients take a few steps each round.
    straggler = start_client(cluster, "straggler", address, "straggler", "--local-epochs", "3")
    for i in range(2):
        start_client(cluster, f"fast-{i}", address, f"fast-{i}", "--max-steps", "5")
    # The first round that selects all three clients is the one the straggler misses.
    target = int(server.wait_for(r"round (\d+): started with 3 clients", timeout=120)[1])
    assert target < rounds, server.output()
    straggler.wait_for(rf"round {target}: received global model", timeout=60)
    straggler.signal(signal.SIGSTOP)
    try:
        server.wait_for(
            rf"round {target}: client straggler missed the deadline", timeout=ROUND_TIMEOUT_S + 60
        )
        # Read while it is still paused: it must have been stopped inside its training.
        paused_in_time = f"round {target}: trained" not in straggler.output()
    finally:
        straggler.signal(signal.SIGCONT)
    assert paused_in_time, straggler.output()

    # Resumed after its round closed, the straggler either finds the round's deadline
    # already past before it starts training (it reports the failure and uploads
    # nothing), or it trains up to the deadline and uploads late, and the server refuses
    # the stale upload on its header. The client usually reads that refusal as
    # FAILED_PRECONDITION; grpc's asyncio client can instead report INTERNAL "Internal
    # error from Core" when the refusal overtakes its own writes (grpc/grpc#36066).
    straggler.wait_for(
        rf"round {target}: (upload refused: (FAILED_PRECONDITION|INTERNAL)"
        r"|its deadline is already past)",
        60,
    )
    # Still a member: it is selected for the next round and receives its model.
    straggler.wait_for(rf"round {target + 1}: received global model", timeout=60)

    assert server.wait(timeout=120) == 0, server.output()
    history = check_history(out, rounds, min_clients=2)
    missed = history[target - 1]
    assert missed["succeeded"] == 2
    assert "straggler" not in clients_of(missed)
    assert "no upload within" in missed["failures"]["straggler"]
    # The refused upload was never counted in any round.
    assert server.output().count(f"round {target}: client straggler uploaded") == 0


async def _held_back(
    messages: list[pb.UpdateMessage], split: int, gate: asyncio.Event
) -> AsyncIterator[pb.UpdateMessage]:
    for message in messages[:split]:
        yield message
    await gate.wait()
    for message in messages[split:]:
        yield message


@pytest.mark.parametrize("late", ["finished_after_deadline", "started_after_deadline"])
async def test_late_upload_is_stale_and_leaves_the_model_alone(
    make_harness: MakeHarness, late: str
) -> None:
    harness: Harness = await make_harness(min_clients=2, rounds=2, round_timeout_s=2.0)
    a, b, c = await connect(harness, "a", "b", "c")
    run = asyncio.create_task(harness.coordinator.run())
    for client in (a, b, c):
        await client.receive_round()
    state = tiny_state()
    late_upload = upload_messages("c", 1, delta_like(state, 50.0))
    gate = asyncio.Event()
    call = None
    if late == "finished_after_deadline":
        # Header and half the payload arrive in time; the rest after the round closed.
        # The server makes a receiver only for an upload it has accepted to start.
        started = asyncio.Event()
        make_receiver = harness.coordinator.new_receiver

        def spy() -> UploadReceiver:
            started.set()
            return make_receiver()

        harness.coordinator.new_receiver = spy
        call = c.stub.PushUpdate(_held_back(late_upload, len(late_upload) // 2, gate))
        await asyncio.wait_for(started.wait(), 10)
    for client in (a, b):
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state, 1.0)))
        )
    await wait_until(lambda: len(harness.rounds) == 1, timeout=20)
    first = harness.rounds[0]
    assert "no upload within" in first.failures["c"]
    after_round_1 = {k: v.clone() for k, v in harness.coordinator.global_state.items()}
    torch.testing.assert_close(after_round_1["layer.bias"], torch.ones(4))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if call is None:
            await c.stub.PushUpdate(stream(late_upload), timeout=10)
        else:
            gate.set()
            await asyncio.wait_for(call, 10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "round 1" in (refused.value.details() or "")
    torch.testing.assert_close(harness.coordinator.global_state, after_round_1)

    # The straggler takes part in the next round like everyone else.
    round_2, _, received = await c.receive_round()
    assert round_2 == 2
    torch.testing.assert_close(received, after_round_1)
    nothing = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    for client in (a, b, c):
        await client.stub.PushUpdate(stream(upload_messages(client.client_id, 2, nothing)))
    summaries = await asyncio.wait_for(run, 20)
    assert [s.round for s in summaries] == [1, 2]
    assert {r.client_id for r in summaries[1].clients} == {"a", "b", "c"}
    # 50.0 never reached the model: round 1 moved it by 1.0, round 2 by nothing.
    torch.testing.assert_close(harness.coordinator.global_state, after_round_1)
