"""Reading round records: metric lookup, --stop-when, --save-best, History; key=value flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedstream.common.config import KeyValues, parse_scalar
from fedstream.common.records import History, MetricGoal, StopRule, lookup
from pydantic import TypeAdapter

RECORD = {
    "round": 3,
    "train": {"loss": 0.5, "accuracy": 0.7},
    "server_eval": {"loss": 0.4},
    "federated_eval": {"loss": 0.45, "accuracy": 0.8},
}


def test_a_bare_metric_is_looked_up_in_server_then_federated_then_train() -> None:
    assert lookup(RECORD, "loss") == 0.4
    assert lookup(RECORD, "accuracy") == 0.8
    assert lookup(RECORD, "train.accuracy") == 0.7
    assert lookup(RECORD, "perplexity") is None


@pytest.mark.parametrize(
    ("rule", "met"),
    [("accuracy>=0.8", True), ("accuracy>0.8", False), ("loss<0.41", True),
     ("train.loss<=0.4", False), ("federated_eval.loss < 0.5", True)],
)
def test_stop_rules(rule: str, met: bool) -> None:
    assert StopRule.parse(rule).met(RECORD) is met


@pytest.mark.parametrize("text", ["accuracy", "accuracy=>0.9", "acc>=x", ">=0.9"])
def test_bad_stop_rules_say_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="METRIC OP NUMBER"):
        StopRule.parse(text)


def test_best_goals_know_which_way_is_better() -> None:
    assert MetricGoal.parse("accuracy").maximise
    assert not MetricGoal.parse("server_eval.mse").maximise
    assert not MetricGoal.parse("loss").maximise
    assert MetricGoal.parse("loss:max").maximise
    goal = MetricGoal.parse("mae")
    assert goal.better(1.0, None) and goal.better(1.0, 2.0) and not goal.better(3.0, 2.0)
    with pytest.raises(ValueError, match="min or max"):
        MetricGoal.parse("loss:down")


def test_history_reads_metrics_jsonl(tmp_path: Path) -> None:
    lines = [dict(RECORD, round=r, failures={"c9": "timeout"} if r == 2 else {})
             for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    history = History.read(tmp_path)
    assert len(history) == 2 and history.metric("loss") == [0.4, 0.4]
    assert history.failures == [{}, {"c9": "timeout"}] and history.last("accuracy") == 0.8


@pytest.mark.parametrize(
    ("given", "expected"),
    [(["a=1", "b=x=y"], {"a": "1", "b": "x=y"}), ("a=1,b=2", {"a": "1", "b": "2"}),
     ({"a": 1, "b": True}, {"a": "1", "b": "true"})],
)
def test_key_values_from_flags_environment_and_toml(given: object,
                                                    expected: dict[str, str]) -> None:
    assert TypeAdapter(KeyValues).validate_python(given) == expected


def test_key_values_refuse_a_pair_without_a_key() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        TypeAdapter(KeyValues).validate_python(["=1"])


def test_values_parse_as_what_they_look_like() -> None:
    assert [parse_scalar(v) for v in ("3", "0.5", "true", "False", "sgd", "1e-3")] == [
        3, 0.5, True, False, "sgd", 1e-3
    ]
