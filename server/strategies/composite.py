"""The strategy most rules are: a per-round reduction followed by a server optimizer.

:class:`Aggregator` does the round's bookkeeping that every rule shares (an upload is
accepted once, its manifest matches, its claimed weight is a valid integer under the cap,
a fold that fails half-way breaks the round instead of leaving a partial sum) and hands
the tensor work to a :class:`~fedstream.server.strategies.base.Reduction`. At the close the
reduction emits the aggregate delta block by block and the strategy's
:class:`~fedstream.server.strategies.optimizers.ServerOptimizer` applies each block to the
global model in place, so no step for the whole model is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.server.strategies.base import (
    ClientConfig,
    ClientReport,
    ConfigValue,
    Reduction,
    RoundAggregator,
    RoundOutcome,
    StagedUpload,
    StrategyError,
    checked_examples,
    weighted_metrics,
)
from fedstream.server.strategies.optimizers import ServerOptimizer


class Aggregator:
    """The round's bookkeeping around a :class:`Reduction`: checks, weights, reports."""

    def __init__(
        self,
        strategy: ServerStrategy,
        round_number: int,
        manifest: Manifest,
        reduction: Reduction,
    ) -> None:
        self._strategy = strategy
        self.round_number = round_number
        self.manifest = manifest
        self._reduction = reduction
        self._reports: list[ClientReport] = []
        self._broken: str | None = None
        self._closed = False

    @property
    def reports(self) -> Sequence[ClientReport]:
        return tuple(self._reports)

    def _check_open(self) -> None:
        if self._closed:
            raise StrategyError(f"round {self.round_number}: the aggregation is already closed")
        if self._broken is not None:
            raise StrategyError(f"round {self.round_number}: aggregation is broken: {self._broken}")

    def accept(self, upload: StagedUpload) -> None:
        self._check_open()
        who = f"round {self.round_number}: client {upload.client_id!r}"
        if any(report.client_id == upload.client_id for report in self._reports):
            raise StrategyError(f"{who} was already accepted")
        difference = self.manifest.describe_difference(upload.manifest)
        if difference is not None:
            raise StrategyError(f"{who}: {difference}")
        claimed = checked_examples(upload)
        weight = self._strategy.weight_of(claimed)
        try:
            self._reduction.take(upload, weight)
        except Exception as error:
            # A fold that stopped half-way left part of this upload in the sum: the round
            # cannot be closed with it, so it fails rather than report a wrong model.
            self._broken = f"{who}: fold failed: {error}"
            raise
        self._reports.append(ClientReport(upload.client_id, claimed, weight, dict(upload.metrics)))

    def finish(self, global_state: MutableMapping[str, torch.Tensor]) -> RoundOutcome:
        self._check_open()
        if not self._reports:
            raise StrategyError(f"round {self.round_number}: no upload was accepted")
        self._closed = True
        try:
            optimizer = self._strategy.optimizer
            optimizer.prepare(self.manifest)

            def apply(spec: TensorSpec, start: int, step: torch.Tensor) -> None:
                target = global_state[spec.name].view(-1)[start : start + step.numel()]
                optimizer.apply(spec, start, target, step)

            info = self._reduction.reduce(apply)
            optimizer.finish_step()
        finally:
            self._reduction.close()
        return RoundOutcome(self._strategy.aggregate_metrics(self._reports), info)

    def discard(self) -> None:
        self._closed = True
        self._reduction.close()


class ServerStrategy:
    """A strategy made of a per-round :class:`Reduction` and a :class:`ServerOptimizer`."""

    def __init__(
        self,
        name: str,
        reduction: Callable[[int, Manifest], Reduction],
        optimizer: ServerOptimizer,
        client_config: Mapping[str, ConfigValue] | None = None,
        max_examples: int | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.name = name
        self._reduction = reduction
        self.optimizer = optimizer
        self.client_config: dict[str, ConfigValue] = dict(client_config or {})
        self.max_examples = max_examples
        self._extra_state = extra_state
        self._load_extra_state = load_extra_state

    def weight_of(self, num_examples: int) -> int:
        """A client's weight: its claimed examples, capped by ``max_examples``."""
        return num_examples if self.max_examples is None else min(num_examples, self.max_examples)

    def configure(
        self, round_number: int, clients: Sequence[str], base_config: Mapping[str, ConfigValue]
    ) -> dict[str, ClientConfig]:
        return {client: {**base_config, **self.client_config} for client in clients}

    def aggregate_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        metrics: dict[str, float] = weighted_metrics(reports)
        return metrics

    def begin_round(self, round_number: int, manifest: Manifest) -> RoundAggregator:
        return Aggregator(self, round_number, manifest, self._reduction(round_number, manifest))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"strategy": self.name, "optimizer": self.optimizer.state_dict()}
        if self._extra_state is not None:
            state["extra"] = self._extra_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise StrategyError(
                f"checkpoint holds state of strategy {state.get('strategy')!r}, this run uses "
                f"{self.name!r}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self._load_extra_state is not None:
            self._load_extra_state(state.get("extra", {}))
