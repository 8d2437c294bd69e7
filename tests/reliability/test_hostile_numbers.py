"""One peer's numbers never crash the server or reach the global model.

Each test drives the in-process server through real gRPC stubs: a hostile client "a"
sends numbers that once killed the server (a claimed ``num_examples`` of 2**64-1, a
finite but enormous delta, a training loss of 1e300) while honest clients upload
beside it. The round must finish with the honest clients alone, the global model must be
their FedAvg bit for bit, and the round's metrics must still be strict JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import pytest
import torch
from fedstream.common.errors import RoundFailed
from fedstream.server.aggregate import fedavg
from fedstream.server.checkpoint import MetricsLog
from fedstream.server.coordinator import summary_record

from tests.integration.conftest import Harness, stream, tiny_state, upload_messages
from tests.integration.test_rounds import delta_like, expect_refused, start_round
from tests.reliability.conftest import MakeHarness

STATE = tiny_state()


def _exactly(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


async def _honest_round(harness: Harness, clients: list, weights: dict[str, int]) -> dict:
    """Upload delta ``i + 1`` from each honest client; return the expected global model."""
    deltas = []
    for i, client in enumerate(clients):
        delta = delta_like(STATE, float(i + 1))
        deltas.append((delta, weights[client.client_id]))
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta, weights[client.client_id]))
        )
    average = fedavg(deltas)
    return {name: STATE[name] + average[name] for name in STATE}


async def test_claimed_num_examples_beyond_the_limit_is_refused_by_number(
    make_harness: MakeHarness,
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    details = await expect_refused(
        clients[0],
        upload_messages("a", 1, delta_like(STATE, 1.0), num_examples=2**64 - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "'a'" in details and str(2**64 - 1) in details and "--max-num-examples" in details
    expected = await _honest_round(harness, clients[1:], {"b": 10, "c": 30})
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2 and "a" in summaries[0].failures
    _exactly(harness.coordinator.global_state, expected)
    json.dumps(summary_record(summaries[0]), allow_nan=False)


async def test_limit_on_examples_is_a_setting(make_harness: MakeHarness) -> None:
    harness: Harness = await make_harness(min_clients=2, max_num_examples=100)
    clients, run = await start_round(harness, "a", "b")
    details = await expect_refused(
        clients[0],
        upload_messages("a", 1, delta_like(STATE, 1.0), num_examples=101),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "101" in details and "100" in details
    # At the limit is allowed, and a refused upload may be followed by a good one.
    await _honest_round(harness, clients, {"a": 100, "b": 100})
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2


@pytest.mark.parametrize(
    ("tensor", "value"),
    [("layer.weight", 1e30), ("layer.bias", -1e16), ("bn.num_batches_tracked", 2**62)],
)
async def test_delta_beyond_the_magnitude_bound_is_refused_naming_the_tensor(
    make_harness: MakeHarness, tensor: str, value: float
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b", "c")
    huge = delta_like(STATE, 1.0)
    huge[tensor] = torch.full_like(huge[tensor], value)
    details = await expect_refused(
        clients[0], upload_messages("a", 1, huge), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert repr(tensor) in details and "--max-update-abs" in details, details
    expected = await _honest_round(harness, clients[1:], {"b": 10, "c": 10})
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2 and "a" in summaries[0].failures
    _exactly(harness.coordinator.global_state, expected)


async def test_delta_at_the_bound_is_accepted(make_harness: MakeHarness) -> None:
    harness: Harness = await make_harness(min_clients=2, max_update_abs=8.0)
    clients, run = await start_round(harness, "a", "b")
    for client in clients:
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(STATE, -8.0)))
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2


async def test_enormous_finite_train_loss_does_not_break_the_metrics(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    harness: Harness = await make_harness(min_clients=2)
    clients, run = await start_round(harness, "a", "b")
    lying = upload_messages("a", 1, delta_like(STATE, 1.0), num_examples=1_000_000_000)
    lying[0].header.metrics["loss"] = 1e300
    await clients[0].stub.PushUpdate(stream(lying))
    await clients[1].stub.PushUpdate(stream(upload_messages("b", 1, delta_like(STATE, 1.0))))
    summaries = await asyncio.wait_for(run, 20)
    # The weighted mean of 1e300 and 0.5 is about 1e300, not an overflow to infinity.
    assert summaries[0].train["loss"] == pytest.approx(1e300)
    log = MetricsLog(tmp_path)
    log.append(summary_record(summaries[0]))
    assert log.read()[0]["train_loss"] == pytest.approx(1e300)


async def test_non_finite_aggregate_fails_the_round_and_keeps_the_weights(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    # Every delta is within the bound, but the server's step overflows float32.
    harness: Harness = await make_harness(min_clients=2, server_lr=1e38)
    clients, run = await start_round(harness, "a", "b")
    for client in clients:
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(STATE, 10.0)))
        )
    with caplog.at_level(logging.ERROR), pytest.raises(RoundFailed, match="aggregate"):
        await asyncio.wait_for(run, 20)
    _exactly(harness.coordinator.global_state, STATE)
    assert "round 1 failed" in caplog.text and "'layer.weight'" in caplog.text
    assert "not be finite" in caplog.text
    assert harness.rounds == []  # nothing recorded, nothing checkpointed
