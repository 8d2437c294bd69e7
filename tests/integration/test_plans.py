"""Round plans on the wire: an id per attempt, failure reports, federated evaluation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fedstream.common import wire
from fedstream.common.messages import EvaluationResult, FailureReport, PlanKind

from .conftest import Harness, stream, upload_messages
from .test_rounds import connect, delta_like, start_round

CALL_TIMEOUT_S = 10.0


def state_of(harness: Harness) -> dict:
    return harness.coordinator.global_state


async def test_an_upload_for_an_earlier_attempt_of_a_round_is_refused(make_harness) -> None:
    harness: Harness = await make_harness(round_timeout_s=1.0, round_retries=1)
    (a, b), run = await start_round(harness, "a", "b")
    first = a.plan
    assert first is not None and first.kind is PlanKind.TRAIN
    # Nobody uploads: the attempt times out and the round is retried under a new id.
    for client in (a, b):
        await client.receive_round()
    assert a.plan is not None and a.plan.round == first.round
    assert a.plan.plan_id != first.plan_id and b.plan.plan_id == a.plan.plan_id
    late = upload_messages("a", 1, delta_like(state_of(harness), 1.0))
    late[0].header.plan_id = first.plan_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await a.stub.PushUpdate(stream(late), timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "that attempt is over" in (refused.value.details() or "")
    for client in (a, b):
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state_of(harness), 1.0))),
            timeout=CALL_TIMEOUT_S,
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2


async def test_a_reported_failure_counts_at_once(make_harness) -> None:
    harness: Harness = await make_harness(round_timeout_s=120.0)
    (a, b, c), run = await start_round(harness, "a", "b", "c")
    for client in (a, b):
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state_of(harness), 1.0))),
            timeout=CALL_TIMEOUT_S,
        )
    assert c.plan is not None
    report = FailureReport("c", c.plan.plan_id, "round config refused: batch_size=0")
    reply = await c.stub.ReportFailure(wire.failure_to_pb(report), timeout=CALL_TIMEOUT_S)
    assert reply.counted
    # The round closes now, not at its 120 s deadline.
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2
    assert summaries[0].failures == {
        "c": "client reports: round config refused: batch_size=0"
    }


async def test_a_failure_report_for_no_open_plan_changes_nothing(make_harness) -> None:
    harness: Harness = await make_harness()
    (a, b), run = await start_round(harness, "a", "b")
    stale = FailureReport("a", "not-a-plan", "made up")
    reply = await a.stub.ReportFailure(wire.failure_to_pb(stale), timeout=CALL_TIMEOUT_S)
    assert not reply.counted
    for client in (a, b):
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state_of(harness), 1.0))),
            timeout=CALL_TIMEOUT_S,
        )
    summaries = await asyncio.wait_for(run, 20)
    assert summaries[0].succeeded == 2 and summaries[0].failures == {}


async def test_federated_evaluation_is_the_example_weighted_mean(make_harness) -> None:
    harness: Harness = await make_harness(evaluate_every=1)
    (a, b), run = await start_round(harness, "a", "b")
    for client in (a, b):
        await client.stub.PushUpdate(
            stream(upload_messages(client.client_id, 1, delta_like(state_of(harness), 1.0))),
            timeout=CALL_TIMEOUT_S,
        )
    scores = {"a": (1, 0.5), "b": (3, 0.9)}
    for client in (a, b):
        await client.receive_round()  # the new global model, to evaluate
        plan = client.plan
        assert plan is not None and plan.kind is PlanKind.EVALUATE
        count, accuracy = scores[client.client_id]
        result = EvaluationResult(client.client_id, 1, plan.plan_id, count,
                                  {"accuracy": accuracy, "num_examples": float(count)})
        await client.stub.SubmitEvaluation(wire.evaluation_to_pb(result),
                                           timeout=CALL_TIMEOUT_S)
        if client.client_id == "a":
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await client.stub.SubmitEvaluation(wire.evaluation_to_pb(result),
                                                   timeout=CALL_TIMEOUT_S)
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    summaries = await asyncio.wait_for(run, 20)
    federated = summaries[0].federated_eval
    assert federated == {"accuracy": pytest.approx((1 * 0.5 + 3 * 0.9) / 4),
                         "num_examples": 4.0}
    assert [e.client_id for e in summaries[0].evaluations] == ["a", "b"]


async def test_an_evaluation_for_a_closed_plan_is_refused(make_harness) -> None:
    harness: Harness = await make_harness()
    clients = await connect(harness, "a", "b")
    result = EvaluationResult("a", 1, "whatever", 5, {"accuracy": 1.0})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await clients[0].stub.SubmitEvaluation(wire.evaluation_to_pb(result),
                                               timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
