"""The Task API: loading by name, metrics, exchanged tensors, fingerprints, the context."""

from __future__ import annotations

import math
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from fedstream.client.settings import ClientSettings
from fedstream.client.trainer import client_task
from fedstream.common.errors import TaskError
from fedstream.common.messages import RunSpec
from fedstream.common.task import (
    Context,
    ModuleTask,
    Partition,
    Task,
    build_seeded,
    checked_metrics,
    exchanged_state,
    fingerprint,
    load_task,
    weighted_mean,
)
from fedstream.common.tasks.classification import ClassificationTask, TrainOptions
from torch import nn


class Tiny(Task):  # type: ignore[misc]
    """A linear model with a frozen buffer, for exchange and fingerprint checks."""

    def __init__(self, width: int = 3) -> None:
        self.width = width

    def build_model(self) -> nn.Module:
        model = nn.Linear(self.width, 1)
        model.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        model.register_buffer("frozen", torch.randn(2))
        return model

    def exchange(self, model: nn.Module) -> list[str]:
        return ["weight", "bias"]


def context(**overrides: object) -> Context:
    values: dict[str, object] = {
        "round": 1, "config": {}, "device": torch.device("cpu"), "seed": 0,
        "partition": Partition(0, 1, 0),
    }
    values.update(overrides)
    return Context(**values)  # type: ignore[arg-type]


def test_weighted_mean_weights_by_examples_and_sums_the_count() -> None:
    merged = weighted_mean([(1, {"loss": 1.0, "num_examples": 1}),
                            (3, {"loss": 5.0, "acc": 0.5, "num_examples": 3})])
    assert merged == {"loss": (1 * 1.0 + 3 * 5.0) / 4, "acc": 0.5, "num_examples": 4.0}


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"loss": math.nan, "num_examples": 3}, "loss"),
        ({"loss": "low", "num_examples": 3}, "not a number"),
        ({"loss": 1.0}, "num_examples"),
        ({"loss": 1.0, "num_examples": 0}, "num_examples"),
        ({"loss": 1.0, "num_examples": True}, "num_examples"),
        ({"loss": 1.0, "num_examples": 2**41}, "num_examples"),
        ([("loss", 1.0)], "mapping"),
    ],
)
def test_checked_metrics_refuses_what_cannot_be_aggregated(metrics: object, needle: str) -> None:
    with pytest.raises(TaskError, match=needle):
        checked_metrics(metrics, "train")


def test_checked_metrics_takes_scalar_tensors_and_counts() -> None:
    count, clean = checked_metrics({"loss": torch.tensor(0.5), "num_examples": 7}, "train")
    assert count == 7 and clean == {"loss": 0.5, "num_examples": 7.0}


def test_default_exchange_is_every_floating_point_tensor() -> None:
    model = build_seeded(ClassificationTask(), seed=0)
    names = Task.exchange(ClassificationTask(), model)
    state = model.state_dict()
    assert names and all(state[n].is_floating_point() for n in names)
    assert {n for n in state if not state[n].is_floating_point()} == {
        n for n in state if n.endswith("num_batches_tracked")
    }


def test_exchanged_state_shares_the_models_storage() -> None:
    task = load_task("tests.unit.test_task:Tiny")
    model = build_seeded(task, seed=1)
    state = exchanged_state(task, model)
    assert list(state) == ["weight", "bias"]
    state["weight"].add_(1.0)
    assert torch.equal(model.weight.detach(), state["weight"])


def test_fingerprint_is_stable_per_seed_and_sees_frozen_tensors() -> None:
    task = load_task("tests.unit.test_task:Tiny")
    first, again, other = (build_seeded(task, seed) for seed in (0, 0, 1))
    names = ["weight", "bias"]
    assert fingerprint(task, first, names) == fingerprint(task, again, names)
    # Another seed: the frozen buffer differs even though the exchanged shapes are equal.
    assert fingerprint(task, first, names) != fingerprint(task, other, names)
    wider = load_task("tests.unit.test_task:Tiny", {"width": 4})
    assert fingerprint(wider, build_seeded(wider, 0), names) != fingerprint(task, first, names)


def test_load_task_takes_classes_with_options_and_modules(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "functions_task.py").write_text(textwrap.dedent("""
        import torch
        def build_model(width=2):
            return torch.nn.Linear(width, 1)
        def load_data(partition):
            return partition.index
        def train(model, data, ctx):
            return {"num_examples": 1}
        def evaluate(model, data, ctx):
            return {"num_examples": 1}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("functions_task", {"width": 5})
    assert isinstance(task, ModuleTask) and task.name == "functions_task"
    assert task.build_model().in_features == 5
    assert task.load_data(Partition(3, 4, 0)) == 3
    assert load_task("tests.unit.test_task:Tiny", {"width": 6}).width == 6


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("no_such_module_here:Task", {}, "PYTHONPATH"),
        ("tests.unit.test_task:Nothing", {}, "has no"),
        ("tests.unit.test_task:Tiny", {"depth": 3}, "depth"),
        ("math", {}, "defines no"),
        ("tests.unit.test_task:context", {}, "not a fedstream Task"),
    ],
)
def test_load_task_errors_name_the_problem(name: str, options: dict[str, object],
                                           needle: str) -> None:
    with pytest.raises(TaskError, match=needle):
        load_task(name, options)  # type: ignore[arg-type]


def test_context_stops_at_the_deadline_or_when_asked() -> None:
    assert not context().should_stop()
    assert context(deadline_unix_s=time.time() - 1).should_stop()
    stop = threading.Event()
    ctx = context(stop_event=stop, deadline_unix_s=time.time() + 60)
    assert not ctx.should_stop()
    stop.set()
    assert ctx.should_stop()


def test_proximal_term_is_half_mu_times_the_squared_distance() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    reference = {"weight": torch.tensor([[0.0, 0.0]])}
    ctx = context(config={"proximal_mu": 0.5}, global_state=reference)
    assert ctx.proximal_term(model).item() == pytest.approx(0.5 * 0.5 * (1 + 4))
    assert float(context(global_state=reference).proximal_term(model)) == 0.0
    with pytest.raises(TaskError, match="proximal_mu"):
        _ = context(config={"proximal_mu": -1.0}).proximal_mu


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"momentum": -5}, "momentum"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"local_epochs": 10**6}, "local_epochs"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_round_config_is_validated_with_the_field_named(config: dict[str, object],
                                                        needle: str) -> None:
    with pytest.raises(TaskError, match=f"round config refused: {needle}"):
        TrainOptions.of(config)


def test_classification_shards_are_disjoint_and_cover_the_held_out_split() -> None:
    task = ClassificationTask(seed=0)
    shards = [task.load_data(Partition(i, 3, 0)) for i in range(3)]
    assert sum(len(s.test_y) for s in shards) == len(task.server_data().test_y)
    assert sum(len(s.train_y) for s in shards) == len(task.splits().train_y)


def test_training_stops_at_the_deadline_and_keeps_what_it_learnt() -> None:
    task = ClassificationTask(seed=0)
    model = build_seeded(task, 0)
    data = task.load_data(Partition(0, 2, 0))
    task.train(model, data, context(config={"max_steps": 1}))  # first-use costs off the clock
    metrics = task.train(model, data, context(config={"local_epochs": 500},
                                              deadline_unix_s=time.time() + 3))
    assert 0 < metrics["steps"] < 500 * math.ceil(len(data.train_y) / 32)


# ---- which task a client runs: only what its own settings name -------------------------

def _run(**overrides: object) -> RunSpec:
    values: dict[str, object] = {
        "model": "cnn", "dataset": "digits", "seed": 0, "test_fraction": 0.2,
        "num_partitions": 2, "partition": "iid", "dirichlet_alpha": 0.5,
    }
    values.update(overrides)
    return RunSpec(**values)  # type: ignore[arg-type]


def test_a_client_refuses_a_task_other_than_its_own_naming_both() -> None:
    with pytest.raises(TaskError, match=r"server runs task 'examples.x:T'.*runs 'classification'"):
        client_task(ClientSettings(), _run(task="examples.x:T"))


def test_a_client_never_imports_code_the_server_names() -> None:
    with pytest.raises(TaskError, match="pass --model evil.module:build"):
        client_task(ClientSettings(), _run(model="evil.module:build"))
    with pytest.raises(TaskError, match="pass --task-opt hook=evil.module:run"):
        client_task(ClientSettings(task="tests.unit.test_task:Tiny"),
                    _run(task="tests.unit.test_task:Tiny",
                         task_options={"hook": "evil.module:run"}))
    assert "evil" not in " ".join(sys.modules)


def test_a_client_takes_built_in_names_and_options_from_the_server() -> None:
    task = client_task(ClientSettings(), _run(dataset="digits", seed=4))
    assert isinstance(task, ClassificationTask) and task.seed == 4
    tiny = client_task(ClientSettings(task="tests.unit.test_task:Tiny", task_opt={"width": "5"}),
                       _run(task="tests.unit.test_task:Tiny", task_options={"width": "2"}))
    assert tiny.width == 5  # its own option wins over the server's
