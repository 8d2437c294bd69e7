"""Who takes part: data shards, session expiry, probation and the round grace period
(issue 10, items 5 and 7). A real grpc.aio server on port 0 and real stubs."""

from __future__ import annotations

from .conftest import FakeClient, Harness, make_config, wait_until
from .test_rounds import connect


def shards(num_partitions: int) -> dict[str, object]:
    base = make_config().run
    return {"run": base.__class__(**{**base.__dict__, "num_partitions": num_partitions})}


async def leave(harness: Harness, client: FakeClient) -> None:
    """The client's process dies: its round stream closes."""
    assert client.watch is not None
    client.watch.cancel()
    await wait_until(lambda: client.client_id not in harness.coordinator.connected_clients())


async def test_a_restarted_client_gets_the_shard_of_the_client_that_left(make_harness) -> None:
    harness: Harness = await make_harness(**shards(2))
    a, b = await connect(harness, "a", "b")
    assert [s.partition_index for s in (harness.coordinator.sessions[c] for c in "ab")] == [0, 1]
    await leave(harness, b)
    # b restarted without --client-id: a new id. Shard 0 is a's, and a is still connected.
    reply = await FakeClient(harness.stub(), "b-restarted").join()
    assert reply.partition_index == 1


async def test_a_free_shard_comes_before_the_shard_of_a_client_that_left(make_harness) -> None:
    harness: Harness = await make_harness(**shards(3))
    a, b = await connect(harness, "a", "b")
    await leave(harness, a)
    assert (await FakeClient(harness.stub(), "c").join()).partition_index == 2  # never used
    assert (await FakeClient(harness.stub(), "d").join()).partition_index == 0  # a's
    # Every shard is taken by a client that is here: the next one shares (and is told so).
    assert (await FakeClient(harness.stub(), "e").join()).partition_index in (1, 2)


async def test_a_returning_client_keeps_its_shard(make_harness) -> None:
    harness: Harness = await make_harness(**shards(2))
    a, b = await connect(harness, "a", "b")
    await leave(harness, b)
    again = await b.join()  # the same process reconnecting, with its credential
    assert again.partition_index == 1
