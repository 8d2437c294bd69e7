"""A client's local side of a round: run its Task on the global weights, compute the delta.

The client builds its task from its own settings only (``client_task``): the server's
run description may name a built-in model or dataset for the default task, but an import
path is only ever taken from this client's own flags, config file or environment. Before
taking part, the client checks that its task is the server's (same name and fingerprint).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from fedstream.client.settings import ClientSettings
from fedstream.common.codec import Manifest
from fedstream.common.config import parse_scalar
from fedstream.common.errors import TaskError
from fedstream.common.messages import RoundPlan, RunSpec, Scalar, TrainReport
from fedstream.common.plugins import is_import_path
from fedstream.common.task import (
    BUILTIN_TASK,
    Context,
    Partition,
    Task,
    build_seeded,
    checked_metrics,
    exchanged_state,
    fingerprint,
    load_exchanged,
    load_task,
)

log = logging.getLogger(__name__)

# Time kept back from the round deadline for the upload: training stops this long before.
UPLOAD_RESERVE_S = 2.0


@dataclass(frozen=True)
class LocalUpdate:
    round: int
    plan_id: str
    delta: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    report: TrainReport


@dataclass(frozen=True)
class LocalEvaluation:
    round: int
    plan_id: str
    num_examples: int
    metrics: dict[str, float]


def client_task(settings: ClientSettings, run: RunSpec) -> Task:
    """The task this client runs: the one its settings name, with the server's options
    under its own. Refuses a server whose task differs or that names code to import."""
    own = settings.task or BUILTIN_TASK
    if own != run.task:
        raise TaskError(
            f"task mismatch: the server runs task {run.task!r}, this client runs {own!r} "
            f"(start the client with --task {run.task} if that is intended)"
        )
    options: dict[str, Scalar] = {}
    if own == BUILTIN_TASK:
        options.update(
            model=settings.model or run.model,
            dataset=settings.dataset or run.dataset,
            data_dir=str(settings.data_dir),
            download=settings.download,
            seed=run.seed,
            test_fraction=run.test_fraction,
            partition=run.partition,
            dirichlet_alpha=run.dirichlet_alpha,
        )
        local = {"model": settings.model, "dataset": settings.dataset}
        for key, value in local.items():
            named = str(options[key])
            if is_import_path(named) and value != named:
                raise TaskError(
                    f"the server's {key} is {named!r}, code this client does not import "
                    f"because a server named it: pass --{key} {named} to run it here"
                )
    else:
        for key, value in run.task_options.items():
            if is_import_path(value) and settings.task_opt.get(key) != value:
                raise TaskError(
                    f"the server's task option {key}={value!r} names code; this client "
                    f"imports only what its own settings name (pass --task-opt {key}={value})"
                )
        options.update({k: parse_scalar(v) for k, v in run.task_options.items()})
    options.update({k: parse_scalar(v) for k, v in settings.task_opt.items()})
    return load_task(own, options)


class TaskRunner:
    """This client's task, model and data between rounds."""

    def __init__(
        self, settings: ClientSettings, run: RunSpec, partition_index: int, device: torch.device
    ) -> None:
        self.settings = settings
        self.device = device
        self.task = client_task(settings, run)
        index = partition_index if settings.partition_index is None else settings.partition_index
        count = settings.num_partitions or run.num_partitions
        self.partition = Partition(index, count, run.seed)
        self.model = build_seeded(self.task, run.seed)
        self.exchanged = exchanged_state(self.task, self.model)
        self.manifest = Manifest.of(self.exchanged)
        mine = fingerprint(self.task, self.model, self.exchanged)
        if run.task_fingerprint and mine != run.task_fingerprint:
            raise TaskError(
                f"task {run.task!r}: this client's model differs from the server's "
                f"(fingerprint {mine} here, {run.task_fingerprint} on the server: another "
                "model, dataset, task option or library version)"
            )
        self.data = self.task.load_data(self.partition)
        self.seed = run.seed * 1_000_003 + index
        self.stop = threading.Event()
        log.info(
            "task %s: shard %d of %d on %s, %d tensors travel (%.2f MB)",
            self.task.name, index, count, device, len(self.manifest.specs),
            self.manifest.total_bytes / 1e6,
        )

    def _context(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> Context:
        overrides = {
            key: value
            for key, value in (
                ("local_epochs", self.settings.local_epochs),
                ("batch_size", self.settings.batch_size),
                ("learning_rate", self.settings.learning_rate),
                ("optimizer", self.settings.optimizer),
                ("max_steps", self.settings.max_steps),
            )
            if value is not None
        }
        deadline = plan.deadline_unix_s - UPLOAD_RESERVE_S if plan.deadline_unix_s else 0.0
        if plan.deadline_unix_s and deadline <= time.time():
            raise TaskError(
                f"round {plan.round}: its deadline is already past (the server's and this "
                "machine's clocks may differ)"
            )
        return Context(
            round=plan.round,
            config={**plan.config, **overrides},
            device=self.device,
            seed=self.seed + plan.round,
            partition=self.partition,
            deadline_unix_s=deadline,
            stop_event=self.stop,
            global_state=global_state,
        )

    def train_round(self, plan: RoundPlan, global_state: dict[str, torch.Tensor]) -> LocalUpdate:
        """Train from ``global_state``; return delta = local - global of the exchanged
        tensors (CPU) with the task's metrics."""
        load_exchanged(self.model, global_state)
        ctx = self._context(plan, global_state)
        started = time.time()
        metrics = self.task.train(self.model, self.data, ctx)
        finished = time.time()
        count, clean = checked_metrics(metrics, f"task {self.task.name!r} train")
        if ctx.should_stop() and not self.stop.is_set():
            log.warning("round %d: training stopped at the round's deadline", plan.round)
        local = self.model.state_dict()
        delta = {}
        for name, base in global_state.items():
            tensor = local[name].detach().cpu() - base
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TaskError(f"round {plan.round}: training made tensor {name!r} non-finite")
            delta[name] = tensor
        report = TrainReport(int(clean.get("steps", 0)), started, finished, str(self.device))
        return LocalUpdate(plan.round, plan.plan_id, delta, count, clean, report)

    def evaluate_round(
        self, plan: RoundPlan, global_state: dict[str, torch.Tensor]
    ) -> LocalEvaluation:
        """The task's metrics of the global weights on this client's held-out data."""
        load_exchanged(self.model, global_state)
        ctx = self._context(plan, global_state)
        metrics = self.task.evaluate(self.model, self.data, ctx)
        count, clean = checked_metrics(metrics, f"task {self.task.name!r} evaluate")
        return LocalEvaluation(plan.round, plan.plan_id, count, clean)
