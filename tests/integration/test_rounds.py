"""A real grpc.aio server on port 0 driven by real stubs: rounds, bad uploads, failures."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from fedstream.common.messages import PROTOCOL_VERSION
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.server.aggregate import fedavg

from .conftest import (
    FakeClient,
    Harness,
    header_message,
    stream,
    tiny_state,
    upload_messages,
    wait_until,
)


def delta_like(state: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {
        name: torch.full_like(t, value) if t.is_floating_point() else torch.ones_like(t)
        for name, t in state.items()
    }


async def connect(harness: Harness, *client_ids: str) -> list[FakeClient]:
    """Join and open the round stream for each client; return once all are attached."""
    clients = [FakeClient(harness.stub(), cid) for cid in client_ids]
    for client in clients:
        await client.join()
        await client.start_watch()
    await wait_until(lambda: len(harness.coordinator.connected_clients()) == len(clients))
    return clients


async def start_round(harness: Harness, *client_ids: str) -> tuple[list[FakeClient], asyncio.Task]:
    """Connect the clients, start the run and let each receive round 1's model."""
    clients = await connect(harness, *client_ids)
    run = asyncio.create_task(harness.coordinator.run())
    for client in clients:
        await client.receive_round()
    return clients, run


async def two_clients_in_round(harness: Harness) -> tuple[FakeClient, FakeClient, asyncio.Task]:
    a, b = await connect(harness, "a", "b")
    run = asyncio.create_task(harness.coordinator.run())
    return a, b, run


async def expect_refused(
    client: FakeClient, messages: list[pb.UpdateMessage], code: grpc.StatusCode
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.PushUpdate(stream(messages))
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_round_applies_example_weighted_fedavg(make_harness) -> None:
    harness: Harness = await make_harness()
    a, b, run = await two_clients_in_round(harness)
    round_a, _, received = await a.receive_round()
    await b.receive_round()
    torch.testing.assert_close(received, tiny_state())
    delta_a, delta_b = delta_like(received, 1.0), delta_like(received, -3.0)
    await a.stub.PushUpdate(stream(upload_messages("a", round_a, delta_a, num_examples=30)))
    await b.stub.PushUpdate(stream(upload_messages("b", round_a, delta_b, num_examples=10)))
    summaries = await asyncio.wait_for(run, 20)
    assert [s.succeeded for s in summaries] == [2]
    expected = fedavg([(delta_a, 30), (delta_b, 10)])
    for name, weights in tiny_state().items():
        torch.testing.assert_close(harness.coordinator.global_state[name], weights + expected[name])
    # 30 * 1 + 10 * -3 = 0: the example weighting, not a plain mean (-1), decides the step.
    torch.testing.assert_close(harness.coordinator.global_state["layer.bias"], torch.zeros(4))


async def test_model_larger_than_grpc_message_limit_passes_both_ways(make_harness) -> None:
    big = {"w": torch.randn(3, 1024, 1024)}  # 12 MiB: three times gRPC's 4 MiB default
    harness: Harness = await make_harness(chunk_size_bytes=1 << 20, min_clients=1)
    harness.coordinator.global_state = {k: v.clone() for k, v in big.items()}
    harness.coordinator.manifest = type(harness.coordinator.manifest).of(big)
    (client,) = await connect(harness, "solo")
    run = asyncio.create_task(harness.coordinator.run())
    round_number, _, received = await client.receive_round()
    torch.testing.assert_close(received["w"], big["w"])
    delta = {"w": torch.full_like(big["w"], 0.5)}
    await client.stub.PushUpdate(stream(upload_messages("solo", round_number, delta, 7, 1 << 20)))
    await asyncio.wait_for(run, 30)
    torch.testing.assert_close(harness.coordinator.global_state["w"], big["w"] + 0.5)


async def test_stale_round_upload_is_refused_and_changes_nothing(make_harness) -> None:
    harness: Harness = await make_harness()
    a, b, run = await two_clients_in_round(harness)
    round_number, _, state = await a.receive_round()
    details = await expect_refused(
        a,
        upload_messages("a", round_number + 5, delta_like(state, 9.0)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"round {round_number + 5}" in details
    await b.receive_round()
    await a.stub.PushUpdate(stream(upload_messages("a", round_number, delta_like(state, 0.0))))
    await b.stub.PushUpdate(stream(upload_messages("b", round_number, delta_like(state, 0.0))))
    await asyncio.wait_for(run, 20)
    torch.testing.assert_close(
        harness.coordinator.global_state["layer.weight"], tiny_state()["layer.weight"]
    )


def _tamper(kind: str, client_id: str, round_number: int, state: dict[str, torch.Tensor]):
    """Upload message lists broken in one specific way, with the status each must get."""
    good = upload_messages(client_id, round_number, delta_like(state, 1.0))
    header, chunks, end = good[0], good[1:-1], good[-1]
    if kind == "data_before_header":
        return [*chunks, header, end], grpc.StatusCode.INVALID_ARGUMENT
    if kind == "empty":
        return [], grpc.StatusCode.INVALID_ARGUMENT
    if kind == "wrong_names":
        renamed = {f"x.{k}": v for k, v in delta_like(state, 1.0).items()}
        return upload_messages(client_id, round_number, renamed), grpc.StatusCode.INVALID_ARGUMENT
    if kind == "wrong_shape":
        reshaped = delta_like(state, 1.0)
        reshaped["layer.weight"] = torch.ones(3, 4)
        return upload_messages(client_id, round_number, reshaped), grpc.StatusCode.INVALID_ARGUMENT
    if kind == "wrong_dtype":
        retyped = delta_like(state, 1.0)
        retyped["layer.bias"] = retyped["layer.bias"].double()
        return upload_messages(client_id, round_number, retyped), grpc.StatusCode.INVALID_ARGUMENT
    if kind == "truncated":
        return [header, *chunks[:-1], end], grpc.StatusCode.DATA_LOSS
    if kind == "no_trailer":
        return [header, *chunks], grpc.StatusCode.DATA_LOSS
    if kind == "overlong":
        extra = pb.UpdateMessage(chunk=pb.Chunk(data=b"\0" * 64))
        return [header, *chunks, extra, end], grpc.StatusCode.INVALID_ARGUMENT
    if kind == "after_end":
        return [header, *chunks, end, chunks[0]], grpc.StatusCode.INVALID_ARGUMENT
    if kind == "checksum":
        bad_end = pb.UpdateMessage(
            end=pb.TransferEnd(total_bytes=end.end.total_bytes, crc32=end.end.crc32 ^ 1)
        )
        return [header, *chunks, bad_end], grpc.StatusCode.DATA_LOSS
    if kind == "flipped_byte":
        data = bytearray(chunks[0].chunk.data)
        data[0] ^= 0xFF
        return [header, pb.UpdateMessage(chunk=pb.Chunk(data=bytes(data))), *chunks[1:], end], (
            grpc.StatusCode.DATA_LOSS
        )
    if kind == "nan":
        poisoned = delta_like(state, 1.0)
        poisoned["layer.weight"][1, 2] = math.nan
        return upload_messages(client_id, round_number, poisoned), grpc.StatusCode.INVALID_ARGUMENT
    if kind == "inf":
        poisoned = delta_like(state, 1.0)
        poisoned["layer.bias"][0] = math.inf
        return upload_messages(client_id, round_number, poisoned), grpc.StatusCode.INVALID_ARGUMENT
    if kind == "unknown_client":
        return upload_messages("mallory", round_number, delta_like(state, 1.0)), (
            grpc.StatusCode.NOT_FOUND
        )
    if kind == "zero_examples":
        return upload_messages(client_id, round_number, delta_like(state, 1.0), 0), (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    if kind == "lying_manifest_size":
        lying = header_message(client_id, round_number, header_manifest(header), 10)
        lying.header.manifest.total_bytes = 1 << 40
        return [lying, *chunks, end], grpc.StatusCode.INVALID_ARGUMENT
    raise ValueError(kind)


def header_manifest(message: pb.UpdateMessage):
    from fedstream.common import wire

    return wire.manifest_from_pb(message.header.manifest)


MALFORMED = [
    "data_before_header",
    "empty",
    "wrong_names",
    "wrong_shape",
    "wrong_dtype",
    "truncated",
    "no_trailer",
    "overlong",
    "after_end",
    "checksum",
    "flipped_byte",
    "nan",
    "inf",
    "unknown_client",
    "zero_examples",
    "lying_manifest_size",
]


@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_upload_gets_specific_status_and_changes_nothing(
    make_harness, kind: str
) -> None:
    # Three clients, two needed: the victim's bad upload fails it, the others carry the round.
    harness: Harness = await make_harness(min_clients=2)
    clients = await connect(harness, "a", "b", "c")
    run = asyncio.create_task(harness.coordinator.run())
    received = [await client.receive_round() for client in clients]
    round_number, _, state = received[0]
    messages, code = _tamper(kind, "a", round_number, state)
    await expect_refused(clients[0], messages, code)
    # Some bad streams carry no usable client id, so the victim also leaves the round
    # rather than keep it open until the deadline.
    clients[0].watch.cancel()
    # The server keeps serving: the two honest clients complete the round.
    for client in clients[1:]:
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, round_number, delta_like(state, 2.0)))
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2
    # Only the honest deltas (2.0 each) moved the model; the bad upload left no trace.
    torch.testing.assert_close(
        harness.coordinator.global_state["layer.weight"], tiny_state()["layer.weight"] + 2.0
    )
    assert torch.isfinite(harness.coordinator.global_state["layer.weight"]).all()


async def test_duplicate_upload_is_counted_once(make_harness) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    state = tiny_state()
    first = upload_messages("a", 1, delta_like(state, 4.0), num_examples=10)
    await clients[0].stub.PushUpdate(stream(first))
    await expect_refused(clients[0], first, grpc.StatusCode.ALREADY_EXISTS)
    await clients[1].stub.PushUpdate(stream(upload_messages("b", 1, delta_like(state, 0.0), 10)))
    await clients[2].stub.PushUpdate(stream(upload_messages("c", 1, delta_like(state, 0.0), 10)))
    await asyncio.wait_for(run, 20)
    # Counted once: (4*10 + 0 + 0) / 30, not (4*10*2) / 40.
    torch.testing.assert_close(
        harness.coordinator.global_state["layer.bias"], torch.full((4,), 40 / 30)
    )


async def test_disconnect_mid_upload_is_a_failure_and_round_completes(make_harness) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    state = tiny_state()
    messages = upload_messages("a", 1, delta_like(state, 100.0))
    half_sent = asyncio.Event()

    async def partial() -> object:
        for message in messages[: len(messages) // 2]:
            yield message
        half_sent.set()
        await asyncio.Event().wait()  # never finishes: the connection will be cut

    call = clients[0].stub.PushUpdate(partial())
    await half_sent.wait()
    # The server has read the header and holds the upload open: now the client vanishes.
    await wait_until(lambda: "a" in harness.coordinator._uploading)
    call.cancel()
    await wait_until(lambda: "a" in harness.coordinator.current.failures)
    for client in clients[1:]:
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state, 1.0)))
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2
    assert "a" in summaries[0].failures
    torch.testing.assert_close(harness.coordinator.global_state["layer.bias"], torch.ones(4))


async def test_client_that_drops_its_round_stream_is_a_failure(make_harness) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    clients[2].watch.cancel()
    await wait_until(lambda: "c" in harness.coordinator.current.failures)
    state = tiny_state()
    for client in clients[:2]:
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state, 1.0)))
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].failures == {"c": "disconnected from the round stream"}


async def test_round_fails_with_clear_message_when_too_few_report(make_harness) -> None:
    from fedstream.common.errors import RoundFailed

    harness: Harness = await make_harness(min_clients=2, round_timeout_s=1.0)
    a, b, run = await two_clients_in_round(harness)
    await a.receive_round()
    await b.receive_round()
    await a.stub.PushUpdate(stream(upload_messages("a", 1, delta_like(tiny_state(), 1.0))))
    with pytest.raises(RoundFailed, match="fewer than 2 clients reported"):
        await asyncio.wait_for(run, 20)
    torch.testing.assert_close(harness.coordinator.global_state, tiny_state())
    # Clients are told the run is over instead of being left waiting.
    finish = await a.watch.read()
    assert finish.WhichOneof("kind") == "finish"


async def test_join_timeout_fails_instead_of_waiting_forever(make_harness) -> None:
    from fedstream.common.errors import RoundFailed

    harness: Harness = await make_harness(min_clients=2, join_timeout_s=0.5)
    only = FakeClient(harness.stub(), "only")
    await only.join()
    await only.start_watch()
    with pytest.raises(RoundFailed, match="only 1 of the 2 required clients"):
        await asyncio.wait_for(harness.coordinator.run(), 20)


async def test_watch_without_join_is_refused(make_harness) -> None:
    harness: Harness = await make_harness()
    stranger = FakeClient(harness.stub(), "stranger")
    await stranger.start_watch()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stranger.watch.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_service_reports_serving(make_harness) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    harness: Harness = await make_harness()
    channel = grpc.aio.insecure_channel(harness.address)
    harness.channels.append(channel)
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="fedstream.v1.Federation")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_joins_beyond_max_clients_get_resource_exhausted(make_harness) -> None:
    harness: Harness = await make_harness(max_clients=2)
    a, _ = await connect(harness, "a", "b")
    late = FakeClient(harness.stub(), "c")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await late.join()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A known client rejoining (after a reconnect, with its credential) is not a new client.
    again = await a.join()
    assert again.client_id == "a"


async def test_second_concurrent_upload_from_one_client_is_refused(make_harness) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b")
    messages = upload_messages("a", 1, delta_like(tiny_state(), 1.0))
    first_open = asyncio.Event()

    async def slow_first() -> object:
        yield messages[0]
        first_open.set()
        await asyncio.Event().wait()

    first = clients[0].stub.PushUpdate(slow_first())
    await first_open.wait()
    await wait_until(lambda: "a" in harness.coordinator._uploading)
    await expect_refused(clients[0], messages, grpc.StatusCode.RESOURCE_EXHAUSTED)
    first.cancel()
    run.cancel()


async def test_rejoin_keeps_the_partition_the_client_trains_on(make_harness) -> None:
    harness: Harness = await make_harness()
    client = FakeClient(harness.stub(), "z")
    request = pb.JoinRequest(
        client_id="z", protocol_version=PROTOCOL_VERSION, partition_index=1
    )
    reply = await client.stub.Join(request)
    assert reply.partition_index == 1
    fresh = await FakeClient(harness.stub(), "y").join()
    assert fresh.partition_index == 0  # the shard nobody has taken yet
