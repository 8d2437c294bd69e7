"""A fold, once started, completes or is undone, whatever happens to the upload's RPC.

The in-process server is driven through real gRPC stubs. The fold of client "a"'s
upload is made slow (it pauses in its worker thread after the first of the model's three
blocks) or made to fail part-way (its staged copy cannot be read back), and the global
model must then hold all of a's delta or none of it: the FedAvg of exactly the uploads
that counted, bit for bit. Every delta value and weight here is a small integer, so
every sum is exact in float32 and any trace of a partial fold would show.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from fedstream.common.errors import RoundFailed
from fedstream.server.aggregate import DeltaAccumulator, fedavg
from fedstream.server.upload import UploadReceiver

from tests.integration.conftest import FakeClient, Harness, stream, tiny_state, upload_messages
from tests.integration.test_rounds import delta_like, start_round, wait_until
from tests.reliability.conftest import MakeHarness

STATE = tiny_state()
WEIGHTS = {"a": 10, "b": 30, "c": 20}
VALUES = {"a": 1.0, "b": -3.0, "c": 2.0}
WAIT_S = 10.0


def _exactly(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _expected(*client_ids: str) -> dict[str, torch.Tensor]:
    average = fedavg([(delta_like(STATE, VALUES[c]), WEIGHTS[c]) for c in client_ids])
    return {name: STATE[name] + average[name] for name in STATE}


def _messages(client_id: str) -> list:
    return upload_messages(client_id, 1, delta_like(STATE, VALUES[client_id]), WEIGHTS[client_id])


async def _upload(client: FakeClient) -> None:
    await client.stub.PushUpdate(stream(_messages(client.client_id)), timeout=WAIT_S)


class _SlowFold:
    """Pauses the round's first fold in its worker thread after its first block."""

    def __init__(self, accumulator: DeltaAccumulator) -> None:
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.events: list[str] = []
        self._fold = accumulator.fold
        accumulator.fold = self  # type: ignore[method-assign]

    def __call__(self, name: str, offset: int, values: torch.Tensor, weight: int) -> None:
        self._fold(name, offset, values, weight)
        self.events.append(f"fold {name}")
        if not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(WAIT_S), "the test never resumed the fold"


def _record_closes(harness: Harness, events: list[str]) -> None:
    make = harness.coordinator.new_receiver

    def receiver() -> UploadReceiver:
        made = make()
        close = made.close

        def recorded_close() -> None:
            events.append("close")
            close()

        made.close = recorded_close  # type: ignore[method-assign]
        return made

    harness.coordinator.new_receiver = receiver  # type: ignore[method-assign]


async def test_upload_cancelled_mid_fold_is_folded_in_full_and_counted_once(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    assert harness.coordinator.current is not None
    slow = _SlowFold(harness.coordinator.current.accumulator)
    _record_closes(harness, slow.events)

    call = clients[0].stub.PushUpdate(stream(_messages("a")), timeout=WAIT_S)
    assert await asyncio.to_thread(slow.paused.wait, WAIT_S)
    # Mid-fold: one of three blocks is in the sum. The client vanishes now.
    call.cancel()
    with caplog.at_level(logging.WARNING):
        await wait_until(lambda: "connection lost" in caplog.text)
    assert slow.events == ["fold layer.weight"]  # the staged file is still open
    slow.resume.set()
    await _upload(clients[1])
    await _upload(clients[2])
    summaries = await asyncio.wait_for(run, 20)

    assert sorted(r.client_id for r in summaries[0].clients) == ["a", "b", "c"]
    assert summaries[0].failures == {}
    # a's three blocks, then its staged file closed; then b's and c's uploads.
    assert slow.events[:4] == [
        "fold layer.weight",
        "fold layer.bias",
        "fold bn.num_batches_tracked",
        "close",
    ]
    _exactly(harness.coordinator.global_state, _expected("a", "b", "c"))


async def test_retry_of_an_upload_being_folded_is_refused_not_staged_twice(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b")
    assert harness.coordinator.current is not None
    slow = _SlowFold(harness.coordinator.current.accumulator)
    call = clients[0].stub.PushUpdate(stream(_messages("a")), timeout=WAIT_S)
    assert await asyncio.to_thread(slow.paused.wait, WAIT_S)
    call.cancel()
    # The reconnected client resends while the first copy is still being folded.
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await _upload(clients[0])
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, busy.value.details()
    slow.resume.set()
    await wait_until(lambda: not harness.coordinator.is_folding("a"))
    with pytest.raises(grpc.aio.AioRpcError) as landed:
        await _upload(clients[0])
    assert landed.value.code() == grpc.StatusCode.ALREADY_EXISTS, landed.value.details()
    await _upload(clients[1])
    await asyncio.wait_for(run, 20)
    _exactly(harness.coordinator.global_state, _expected("a", "b"))


class _UnreadableAfterFirstBlock(UploadReceiver):
    """A staged upload whose read-back fails after one block (an I/O error on the spool
    disk), on the fold's pass only, or on the undo's pass too."""

    undo_fails = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.passes = 0

    def _iter(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        self.passes += 1
        if self.passes == 2 and not self.undo_fails:
            yield from super()._iter()
            return
        blocks = super()._iter()
        yield next(blocks)
        raise OSError(5, "Input/output error")


def _first_receiver_unreadable(harness: Harness, undo_fails: bool) -> None:
    make = harness.coordinator.new_receiver
    made: list[UploadReceiver] = []

    def receiver() -> UploadReceiver:
        if made:
            made.append(make())
        else:
            coordinator = harness.coordinator
            flaky = _UnreadableAfterFirstBlock(
                coordinator.manifest,
                coordinator.config.spool_memory_bytes,
                coordinator.config.spool_dir,
                coordinator.config.max_update_abs,
            )
            flaky.undo_fails = undo_fails
            made.append(flaky)
        return made[-1]

    harness.coordinator.new_receiver = receiver  # type: ignore[method-assign]


async def test_fold_that_fails_part_way_is_undone_and_the_round_counts_the_others(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    _first_receiver_unreadable(harness, undo_fails=False)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _upload(clients[0])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "Input/output error" in (refused.value.details() or "")
    await _upload(clients[1])
    await _upload(clients[2])
    summaries = await asyncio.wait_for(run, 20)
    assert sorted(r.client_id for r in summaries[0].clients) == ["b", "c"]
    assert "a" in summaries[0].failures
    _exactly(harness.coordinator.global_state, _expected("b", "c"))


async def test_fold_that_cannot_be_undone_fails_the_round_and_keeps_the_weights(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    _first_receiver_unreadable(harness, undo_fails=True)
    for client in clients:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _upload(client)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    with pytest.raises(RoundFailed, match="could not be undone"):
        await asyncio.wait_for(run, 20)
    _exactly(harness.coordinator.global_state, STATE)
