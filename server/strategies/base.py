"""The strategy interface: what a round asks of an aggregation strategy.

A round (``server/coordinator.py``) talks to a :class:`Strategy` in four steps::

    configs = strategy.configure(round, clients, base_config)   # one config map per client
    aggregator = strategy.begin_round(round, manifest)
    aggregator.accept(upload)          # once per validated staged upload, in arrival order
    outcome = aggregator.finish(global_state)   # reduce, step the global model in place

and checkpoints ``strategy.state_dict()`` with the model, so that ``load_state_dict`` on a
resumed run continues exactly where the interrupted one stopped. A round that fails calls
``aggregator.discard()`` instead of ``finish``.

What a strategy reads is a :class:`StagedUpload`: a client's validated delta, wherever it
was staged (memory or disk), read back block by block. ``accept`` takes ownership of the
upload: a FedAvg-like rule folds it into a running sum at once and releases it; a robust
rule keeps it staged and reads every kept upload block by block at the close.

Underneath, a :class:`~fedstream.server.strategies.composite.ServerStrategy` is made of two
pure parts:

- a :class:`Reduction` per round (``take`` each upload, then ``reduce`` the kept state to
  the round's aggregate delta, emitted one block of one tensor at a time), and
- a :class:`~fedstream.server.strategies.optimizers.ServerOptimizer`, which moves the global
  model by that aggregate, block by block (plain step, momentum, Adam, Yogi, Adagrad).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.task import weighted_mean

ConfigValue = bool | int | float | str
ClientConfig = dict[str, ConfigValue]
Info = dict[str, float | int | str | list[str]]
# The aggregate delta of one block: (tensor name, first element, values in a wide dtype).
ApplyBlock = Callable[[TensorSpec, int, torch.Tensor], None]

# Claimed example counts are weights: anything not a positive integer below 2**53 (the
# largest exactly representable in a float64) is refused.
MAX_EXAMPLES = (1 << 53) - 1


class StrategyError(ValueError):
    """A strategy's option, state or input is invalid; the message names the culprit."""


class StagedUpload(Protocol):
    """One client's validated delta, as a strategy sees it (memory or disk behind it)."""

    @property
    def client_id(self) -> str: ...

    @property
    def num_examples(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def manifest(self) -> Manifest: ...

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``name``, flat, in its own dtype.

        The result may share a buffer that the next ``read`` on the same upload
        overwrites: callers copy what they keep.
        """
        ...

    def release(self) -> None:
        """Free the staged bytes; the upload is not read again."""
        ...


@dataclass(frozen=True)
class ClientReport:
    """What a round keeps of an accepted upload once its tensors are folded or reduced."""

    client_id: str
    num_examples: int  # as claimed
    weight: int  # as used: the claim under the strategy's cap
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class RoundOutcome:
    """What the close of a round reports: aggregated client metrics and what was done."""

    metrics: dict[str, float]
    info: Info = field(default_factory=dict)


def checked_examples(upload: StagedUpload) -> int:
    value = upload.num_examples
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EXAMPLES:
        raise StrategyError(
            f"client {upload.client_id!r}: num_examples must be an integer in [1, 2**53), "
            f"got {value!r}"
        )
    return value


def iter_blocks(manifest: Manifest, block_elements: int) -> Iterator[tuple[TensorSpec, int, int]]:
    """(spec, start, count) covering every tensor in blocks of at most ``block_elements``."""
    if block_elements < 1:
        raise ValueError(f"block_elements must be positive, got {block_elements}")
    for spec in manifest.specs:
        for start in range(0, spec.numel, block_elements):
            yield spec, start, min(block_elements, spec.numel - start)


def weighted_metrics(reports: Sequence[ClientReport]) -> dict[str, float]:
    """Each metric's example-weighted mean over the clients that report it (the Task
    API's :func:`~fedstream.common.task.weighted_mean`, by the weights the strategy used)."""
    merged: dict[str, float] = weighted_mean([(r.weight, r.metrics) for r in reports])
    return merged


class Reduction(Protocol):
    """One round's combination of uploads into an aggregate delta (pure tensor work)."""

    def take(self, upload: StagedUpload, weight: int) -> bool:
        """Absorb ``upload``; True when it was kept (the reduction releases it later)."""
        ...

    def reduce(self, apply: ApplyBlock) -> Info:
        """Emit the aggregate delta block by block through ``apply``; what was done."""
        ...

    def close(self) -> None:
        """Release whatever is still kept (after ``reduce``, or when the round failed)."""
        ...


class RoundAggregator(Protocol):
    """One round's uploads: ``accept`` each, then ``finish`` once (or ``discard``)."""

    @property
    def reports(self) -> Sequence[ClientReport]: ...

    def accept(self, upload: StagedUpload) -> None:
        """Take a validated staged upload; on success the aggregator owns it.

        On an error the caller still owns (and releases) the upload. Raises
        :class:`StrategyError` for an upload that does not belong in this round.
        """
        ...

    def finish(self, global_state: MutableMapping[str, torch.Tensor]) -> RoundOutcome:
        """Reduce the accepted uploads and step ``global_state`` in place.

        Refusals (too few uploads for the rule, unusable DP settings) are raised before
        anything changes. The step is applied block by block as the reduction emits it, so
        an I/O error reading a staged upload part-way leaves ``global_state`` partly
        stepped: the caller then fails the run or restores the last checkpoint.
        """
        ...

    def discard(self) -> None:
        """The round failed: release every kept upload, change nothing."""
        ...


class Strategy(Protocol):
    """An aggregation strategy: configuration, per-round aggregation, durable state.

    A structural interface: any class with these members is a strategy.
    """

    name: str

    def configure(
        self, round_number: int, clients: Sequence[str], base_config: Mapping[str, ConfigValue]
    ) -> dict[str, ClientConfig]:
        """The config map each selected client trains the round with."""
        ...

    def begin_round(self, round_number: int, manifest: Manifest) -> RoundAggregator: ...

    def aggregate_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        """Client metrics of a round, combined (by default :func:`weighted_metrics`)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: tensors, numbers and strings only (weights_only)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
