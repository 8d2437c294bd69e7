"""Shared inputs for the strategy tests: small deltas of mixed dtypes and rounds run on them."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch
from fedstream.common.codec import Manifest
from fedstream.server.strategies import InMemoryUpload, RoundOutcome, Strategy


def mixed_deltas(count: int, seed: int, floats_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` deltas with float32, float16, bfloat16, float64, integer and scalar tensors.

    Sizes are primes so that blocks split tensors at odd places.
    """
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(count):
        delta = {
            "conv.weight": torch.randn(7, 1, 3, 3, generator=gen),
            "conv.bias": torch.randn(7, generator=gen),
            "half": torch.randn(13, generator=gen).half(),
            "brain": torch.randn(5, generator=gen).bfloat16(),
            "scale": torch.randn((), generator=gen, dtype=torch.float64),
        }
        if not floats_only:
            delta["bn.num_batches_tracked"] = torch.randint(0, 50, (), generator=gen)
        deltas.append(delta)
    return deltas


def zeros_like(delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(tensor) for name, tensor in delta.items()}


def uploads(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int] | None = None
) -> list[InMemoryUpload]:
    weights = weights or [10 * (i + 1) for i in range(len(deltas))]
    return [
        InMemoryUpload(f"c{i}", weight, delta, {"train_loss": float(i)})
        for i, (delta, weight) in enumerate(zip(deltas, weights, strict=True))
    ]


def run_round(
    strategy: Strategy,
    global_state: MutableMapping[str, torch.Tensor],
    staged: Sequence[InMemoryUpload],
    round_number: int = 1,
) -> RoundOutcome:
    aggregator = strategy.begin_round(round_number, Manifest.of(dict(global_state)))
    for upload in staged:
        aggregator.accept(upload)
    return aggregator.finish(global_state)


def clone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()}


def assert_equal_states(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name}: {got[name]} != {tensor}"
