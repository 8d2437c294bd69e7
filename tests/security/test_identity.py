"""A client id belongs to the client that first joined under it (issue 10, item 4).

A shared join token enrols; the credential the first Join returns is what proves the id
afterwards. In-process server with real stubs: another stub has no credential, exactly
like another process holding only the shared token. The last test runs real processes.
"""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import grpc
import pytest
import torch
from fedstream.common.messages import PROTOCOL_VERSION
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.server.auth import TokenTable

from tests.integration.conftest import FakeClient, Harness, stream, tiny_state, upload_messages
from tests.integration.test_rounds import connect, delta_like, expect_refused
from tests.procs import Cluster, client_argv, read_metrics, start_fl_server

SHARED = TokenTable({"*": "shared-join-token", "alice": "alices-own-token"})


def impostor(harness: Harness, client_id: str) -> FakeClient:
    """Another process using ``client_id``: a stub of its own, without that id's credential."""
    return FakeClient(harness.stub(), client_id)


async def test_upload_under_another_clients_id_is_refused_and_changes_nothing(
    make_harness,
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    a, b = await connect(harness, "a", "b")
    run = asyncio.create_task(harness.coordinator.run())
    for client in (a, b):
        await client.receive_round()
    state = tiny_state()
    forged = upload_messages("a", 1, delta_like(state, 100.0))
    details = await expect_refused(
        impostor(harness, "a"), forged, grpc.StatusCode.UNAUTHENTICATED
    )
    assert "credential" in details
    assert harness.coordinator.current is not None
    assert "a" not in harness.coordinator.current.failures  # the impostor is not "a"
    # The real client's upload is the one that counts.
    await a.stub.PushUpdate(stream(upload_messages("a", 1, delta_like(state, 1.0))))
    await b.stub.PushUpdate(stream(upload_messages("b", 1, delta_like(state, 1.0))))
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2
    torch.testing.assert_close(
        harness.coordinator.global_state["layer.weight"], state["layer.weight"] + 1.0
    )


async def test_watch_under_another_clients_id_is_refused_and_does_not_replace_it(
    make_harness,
) -> None:
    harness: Harness = await make_harness(min_clients=1)
    (a,) = await connect(harness, "a")
    fake = impostor(harness, "a")
    await fake.start_watch()
    assert fake.watch is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fake.watch.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The real stream was not told it was replaced: it still gets the round.
    run = asyncio.create_task(harness.coordinator.run())
    round_number, _, _ = await a.receive_round()
    assert harness.coordinator.connected_clients() == ["a"]
    await a.stub.PushUpdate(stream(upload_messages("a", round_number, delta_like(tiny_state(), 0))))
    assert (await asyncio.wait_for(run, 20))[0].succeeded == 1


async def test_join_under_a_taken_id_is_refused_but_the_owner_rejoins(make_harness) -> None:
    harness: Harness = await make_harness(tokens=SHARED)
    owner = FakeClient(harness.stub(), "bob")
    shared = (("authorization", "Bearer shared-join-token"),)
    request = pb.JoinRequest(client_id="bob", protocol_version=PROTOCOL_VERSION)
    first = await owner.stub.Join(request, metadata=shared)
    assert len(first.credential) >= 32
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await impostor(harness, "bob").stub.Join(request, metadata=shared)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'bob' is taken" in (caught.value.details() or "")
    again = await owner.stub.Join(request, metadata=shared)  # its stub presents the credential
    assert again.credential == ""  # nothing new issued: the first one still holds
    assert again.partition_index == first.partition_index


async def test_a_clients_own_token_enrols_it_again_and_retires_the_old_credential(
    make_harness,
) -> None:
    harness: Harness = await make_harness(tokens=SHARED)
    request = pb.JoinRequest(client_id="alice", protocol_version=PROTOCOL_VERSION)
    own = (("authorization", "Bearer alices-own-token"),)
    before = FakeClient(harness.stub(), "alice")
    await before.stub.Join(request, metadata=own)
    after = FakeClient(harness.stub(), "alice")  # restarted, its state lost
    reply = await after.stub.Join(request, metadata=own)
    assert reply.credential
    await before.start_watch()
    assert before.watch is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await before.watch.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_teardown_of_a_replaced_stream_leaves_the_new_one_connected(make_harness) -> None:
    harness: Harness = await make_harness(min_clients=2)
    a, b = await connect(harness, "a", "b")
    old_watch = a.watch
    assert old_watch is not None
    await a.start_watch()  # a reconnect that raced the old stream's end
    replaced = await old_watch.read()
    assert replaced.WhichOneof("kind") == "finish"
    assert replaced.finish.kind == pb.FINISH_REPLACED
    assert await old_watch.read() is grpc.aio.EOF  # the old handler has run its teardown
    assert harness.coordinator.connected_clients() == ["a", "b"]
    run = asyncio.create_task(harness.coordinator.run())
    for client in (a, b):
        await client.receive_round()  # a's new stream carries the round
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(tiny_state(), 0.0)))
        )
    assert (await asyncio.wait_for(run, 20))[0].succeeded == 2


async def test_a_round_taken_by_a_stream_that_was_then_replaced_is_sent_again(
    make_harness,
) -> None:
    harness: Harness = await make_harness(min_clients=1)
    (a,) = await connect(harness, "a")
    run = asyncio.create_task(harness.coordinator.run())
    assert a.watch is not None
    first = await a.watch.read()  # the old stream took round 1, then the link broke
    assert first.WhichOneof("kind") == "round_start"
    await a.start_watch()
    round_number, _, received = await a.receive_round()
    assert round_number == 1
    torch.testing.assert_close(received, tiny_state())
    await a.stub.PushUpdate(stream(upload_messages("a", 1, delta_like(tiny_state(), 0.0))))
    assert (await asyncio.wait_for(run, 20))[0].succeeded == 1


@pytest.mark.e2e
def test_shared_token_holders_cannot_act_as_an_enrolled_client(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Real processes: an impostor under alice's id is refused at Join; alice, killed and
    restarted, proves her id with the credential in her state file and finishes the run."""
    token_file = tmp_path / "tokens"
    token_file.write_text("* shared-join-token\n")
    server, port = start_fl_server(
        cluster, tmp_path / "run", "--rounds", "3", "--min-clients", "1",
        "--round-timeout", "60", "--token-file", str(token_file), "--log-level", "DEBUG",
    )  # fmt: skip
    token = {"FL_CLIENT_TOKEN": "shared-join-token"}
    alice_state = tmp_path / "alice-state"

    def alice(name: str) -> object:
        return cluster.start(
            name,
            client_argv("--server", f"127.0.0.1:{port}", "--client-id", "alice",
                        "--state-dir", str(alice_state), "--backoff-initial-s", "0.2"),
            env=token,
        )  # fmt: skip

    first = alice("alice")
    first.wait_for(r"round 1: upload accepted", timeout=120)
    saved = alice_state / "alice.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["server"] == f"127.0.0.1:{port}"
    first.kill()
    mallory = cluster.start(
        "mallory",
        client_argv("--server", f"127.0.0.1:{port}", "--client-id", "alice",
                    "--state-dir", str(tmp_path / "mallory-state")),
        env=token,
    )  # fmt: skip
    assert mallory.wait(timeout=60) == 1
    assert "'alice' is taken" in mallory.output()
    again = alice("alice-again")
    assert again.wait(timeout=120) == 0, again.output()
    assert server.wait(timeout=60) == 0, server.output()
    server.wait_for(r"client alice joined again")
    secret = json.loads(saved.read_text())["credential"]
    assert secret not in server.output() and secret not in again.output()
    assert [len(record["clients"]) for record in read_metrics(tmp_path / "run")] == [1, 1, 1]
