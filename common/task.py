"""The Task API: what a federation trains, written by its user.

A task says, for a client, how to build the model, how to load this client's data for
``(partition index, number of partitions, seed)``, how to train for a round and how to
evaluate, and which tensors travel (``exchange``). For the server it says how to build
the initial model and, optionally, a server-side test set and how to aggregate the
clients' metrics (default: the example-weighted mean of every metric)::

    class MyTask(fedstream.Task):
        def build_model(self):
            return nn.Linear(10, 1)

        def load_data(self, partition):
            return my_shard(partition.index, partition.count, partition.seed)

        def train(self, model, data, ctx):
            ...  # read ctx.config["learning_rate"], stop when ctx.should_stop()
            return {"loss": loss, "num_examples": len(data)}

        def evaluate(self, model, data, ctx):
            return {"loss": loss, "num_examples": len(data)}

A task is named by import path (``mypkg.mytask:MyTask``: a Task subclass, built with the
``--task-opt`` options as keyword arguments, or a factory returning a Task) or by a module
of functions with those names (``mypkg.mytask``). A process imports only the task its own
settings name: the server sends the name and a fingerprint, never code, and a client whose
task differs refuses to take part.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from fedstream.common.codec import Manifest
from fedstream.common.errors import TaskError
from fedstream.common.messages import Scalar
from torch import nn

BUILTIN_TASK = "classification"
# An upload's claimed example count is an integer weight; anything larger is a lie.
MAX_EXAMPLES = 2**40
Metrics = Mapping[str, float]


@dataclass(frozen=True)
class Partition:
    """Which shard of the data a client holds: ``index`` of ``count``, split by ``seed``."""

    index: int
    count: int
    seed: int


@dataclass
class Context:
    """What ``train`` and ``evaluate`` know about the round they run in.

    ``config`` is the round's config map chosen by the server (plus this client's own
    overrides); ``deadline_unix_s`` is when the server stops waiting (0: none). A long
    loop calls :meth:`should_stop` between steps and returns what it has when it says
    so, which happens at the deadline (less a margin for the upload) or when the client
    is asked to stop. ``progress(done, total)`` reports steps; it is cheap to call.
    """

    round: int
    config: Mapping[str, Scalar]
    device: torch.device
    seed: int
    partition: Partition
    deadline_unix_s: float = 0.0
    progress: Callable[[int, int], None] = lambda done, total: None
    stop_event: threading.Event = field(default_factory=threading.Event)
    # The weights this round started from (the exchanged tensors), for proximal terms.
    global_state: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def should_stop(self) -> bool:
        if self.stop_event.is_set():
            return True
        return bool(self.deadline_unix_s) and time.time() >= self.deadline_unix_s

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu from the round config (0 when the strategy sets none)."""
        value = self.config.get("proximal_mu", 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TaskError(f"round config: proximal_mu must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise TaskError(f"round config: proximal_mu must be finite and >= 0, got {value}")
        return float(value)

    def proximal_term(self, model: nn.Module) -> torch.Tensor:
        """FedProx's mu/2 * ||w - w_global||^2 over the exchanged parameters (Li et al.
        2020, arXiv:1812.06127); zero when mu is 0. Add it to the loss before backward."""
        mu = self.proximal_mu
        zero = torch.zeros((), device=self.device)
        if mu == 0.0 or not self.global_state:
            return zero
        total = zero
        for name, parameter in model.named_parameters():
            reference = self.global_state.get(name)
            if reference is not None and parameter.requires_grad:
                total = total + (parameter - reference.to(parameter.device)).pow(2).sum()
        return 0.5 * mu * total


class Task:
    """Base class of a federated task; override the four client methods at least."""

    #: The name clients and server agree on; set from the import path when loaded.
    name: str = ""

    # ---- client side -----------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh model. Called with torch's RNG seeded by the run's seed, on every
        process, so frozen tensors (a LoRA base model) are identical everywhere."""
        raise NotImplementedError

    def load_data(self, partition: Partition) -> Any:
        """This client's data: whatever ``train`` and ``evaluate`` take."""
        raise NotImplementedError

    def train(self, model: nn.Module, data: Any, ctx: Context) -> Metrics:
        """Train ``model`` in place; return metrics including ``num_examples``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, ctx: Context) -> Metrics:
        """Metrics of ``model`` on the held-out part of ``data``, with ``num_examples``."""
        raise NotImplementedError

    def exchange(self, model: nn.Module) -> list[str]:
        """Names of the ``state_dict`` entries that travel: every floating-point
        parameter and buffer by default. For PEFT, return only the adapter tensors."""
        return [name for name, t in model.state_dict().items() if t.is_floating_point()]

    # ---- server side -----------------------------------------------------------------

    def initial_model(self) -> nn.Module:
        """The global model of round 1 (seeded like ``build_model``)."""
        return self.build_model()

    def server_data(self) -> Any | None:
        """A server-side test set for ``server_evaluate``, or None for none."""
        return None

    def server_evaluate(self, model: nn.Module, data: Any, ctx: Context) -> Metrics:
        return self.evaluate(model, data, ctx)

    def aggregate_metrics(self, results: Sequence[tuple[int, Metrics]]) -> dict[str, float]:
        """Combine clients' metrics; ``results`` holds (num_examples, metrics) pairs."""
        return weighted_mean(results)

    def options(self) -> dict[str, Scalar]:
        """The task's settings, for run records (override to list your own)."""
        return {}


class ModuleTask(Task):
    """A task written as a module of functions: ``build_model()``, ``load_data(partition)``,
    ``train(model, data, ctx)``, ``evaluate(model, data, ctx)`` and optionally ``exchange``,
    ``initial_model``, ``server_data``, ``server_evaluate`` and ``aggregate_metrics``."""

    REQUIRED = ("build_model", "load_data", "train", "evaluate")
    OPTIONAL = ("exchange", "initial_model", "server_data", "server_evaluate",
                "aggregate_metrics")

    def __init__(self, module: ModuleType, **options: Scalar) -> None:
        missing = [n for n in self.REQUIRED if not callable(getattr(module, n, None))]
        if missing:
            raise TaskError(f"task module {module.__name__!r} defines no {', '.join(missing)}")
        self._module = module
        self._options = dict(options)
        for name in self.REQUIRED + self.OPTIONAL:
            function = getattr(module, name, None)
            if callable(function):
                setattr(self, name, _with_options(function, self._options))

    def options(self) -> dict[str, Scalar]:
        return dict(self._options)


def _with_options(function: Callable[..., Any], options: Mapping[str, Scalar]
                  ) -> Callable[..., Any]:
    """``function`` with the task options it declares as keyword parameters filled in."""
    accepted = inspect.signature(function).parameters
    bound = {k: v for k, v in options.items() if k in accepted}
    return lambda *args: function(*args, **bound)


def weighted_mean(results: Sequence[tuple[int, Metrics]]) -> dict[str, float]:
    """The num_examples-weighted mean of every metric, over the clients that report it;
    ``num_examples`` itself, where reported, is summed.

    Weights are normalised before they multiply, so a finite metric (a loss of 1e300)
    never overflows into infinity, and sums are ``math.fsum``: the result does not
    depend on the order of ``results``.
    """
    values: dict[str, list[tuple[float, int]]] = {}
    for count, metrics in results:
        for key, value in metrics.items():
            values.setdefault(key, []).append((float(value), count))
    merged: dict[str, float] = {}
    for key, pairs in sorted(values.items()):
        if key == "num_examples":
            merged[key] = math.fsum(value for value, _ in pairs)
            continue
        total = math.fsum(weight for _, weight in pairs)
        if total:
            merged[key] = math.fsum(value * (weight / total) for value, weight in pairs)
    return merged


def checked_metrics(metrics: object, what: str, need_examples: bool = True
                    ) -> tuple[int, dict[str, float]]:
    """(num_examples, metrics as floats) of a task's result; TaskError says what is wrong.

    ``num_examples`` must be an int from 1 to 2**40 when ``need_examples`` (it weighs the
    client's update); otherwise it may be missing (0 is returned).
    """
    if not isinstance(metrics, Mapping):
        raise TaskError(f"{what} returned {type(metrics).__name__}, not a mapping of metrics")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TaskError(f"{what}: metric names must be non-empty strings, got {key!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TaskError(f"{what}: metric {key!r} is {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise TaskError(f"{what}: metric {key!r} is {value}")
        clean[key] = float(value)
    count = metrics.get("num_examples")
    if count is None and not need_examples:
        return 0, clean
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EXAMPLES:
        raise TaskError(f"{what}: num_examples must be an int from 1 to 2**40, got {count!r}")
    return count, clean


# ---- loading by name ---------------------------------------------------------------------


def load_task(name: str, options: Mapping[str, Scalar] | None = None) -> Task:
    """The task ``name`` names, built with ``options``: the built-in ``classification``,
    ``package.module:Attribute`` (a Task subclass, a factory or an instance), or
    ``package.module`` (a module of functions). Only ever called with a name from the
    local settings."""
    options = dict(options or {})
    if name == BUILTIN_TASK:
        from fedstream.common.tasks.classification import ClassificationTask

        task: Task = _construct(ClassificationTask, options, name)
    else:
        module_name, _, attribute = name.partition(":")
        module = _import(module_name, name)
        if not attribute:
            task = ModuleTask(module, **options)
        else:
            target: Any = module
            for part in attribute.split("."):
                if not hasattr(target, part):
                    raise TaskError(f"task {name!r}: module {module_name!r} has no {attribute!r}")
                target = getattr(target, part)
            if isinstance(target, Task):
                if options:
                    raise TaskError(f"task {name!r} is an instance: it takes no --task-opt")
                task = target
            elif callable(target):
                task = _construct(target, options, name)
            else:
                raise TaskError(f"task {name!r} is a {type(target).__name__}, not a Task")
    if not isinstance(task, Task):
        raise TaskError(f"task {name!r} built a {type(task).__name__}, not a fedstream Task")
    task.name = name
    return task


def _import(module_name: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        searched = ", ".join(p or "." for p in sys.path[:8])
        raise TaskError(
            f"task {name!r}: cannot import {module_name!r} ({error}); searched sys.path: "
            f"{searched}. A task module must be importable on every machine (set PYTHONPATH)."
        ) from error


def _construct(factory: Callable[..., Any], options: Mapping[str, Scalar], name: str) -> Any:
    try:
        return factory(**options)
    except TypeError as error:
        raise TaskError(
            f"task {name!r}: bad --task-opt options {sorted(options)}: {error}"
        ) from error


# ---- models, exchanged tensors and fingerprints ------------------------------------------


def build_seeded(task: Task, seed: int, server: bool = False) -> nn.Module:
    """``task``'s model with torch's RNG seeded first, so every process builds the same."""
    torch.manual_seed(seed)
    model = task.initial_model() if server else task.build_model()
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r} built a {type(model).__name__}, not an nn.Module")
    return model


def exchanged_state(task: Task, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that travel, in ``state_dict`` order, sharing the model's storage."""
    state = model.state_dict(keep_vars=False)
    names = task.exchange(model)
    unknown = [n for n in names if n not in state]
    if unknown:
        raise TaskError(f"task {task.name!r}: exchange names unknown tensors {unknown[:5]}")
    if not names:
        raise TaskError(f"task {task.name!r}: exchange names no tensors")
    wanted = set(names)
    return {name: t.detach() for name, t in state.items() if name in wanted}


def fingerprint(task: Task, model: nn.Module, exchanged: Iterable[str]) -> str:
    """A short hash of what travels (names, dtypes, shapes) and of the frozen tensors'
    values, so two processes that would build different models never train together."""
    digest = hashlib.sha256(task.name.encode())
    state = model.state_dict()
    names = set(exchanged)
    manifest = Manifest.of({n: t for n, t in state.items() if n in names})
    for spec in manifest.specs:
        digest.update(f"{spec.name}|{spec.dtype}|{spec.shape};".encode())
    for name, tensor in state.items():
        if name not in names:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{name}:{zlib.crc32(data.tobytes())};".encode())
    return digest.hexdigest()[:16]


def load_exchanged(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy received tensors into ``model`` (the others keep their values)."""
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
