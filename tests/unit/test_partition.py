"""Data shards: every client computes the same split alone, and the shards tile the data.

Labels come from scikit-learn's bundled digits (real labels, 10 classes), so the
Dirichlet label-skew checks run on a realistic class balance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedstream.common.data import load_dataset
from fedstream.common.errors import ConfigError
from fedstream.common.partition import shard_indices

SCHEMES = [("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 1.0)]


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    train_y: torch.Tensor = load_dataset("digits", Path("unused"), seed=0).train_y  # no folder
    return train_y


def all_shards(
    labels: torch.Tensor, count: int, scheme: str, alpha: float, seed: int
) -> list[torch.Tensor]:
    return [shard_indices(labels, i, count, scheme, alpha, seed) for i in range(count)]


def distance_from_uniform(labels: torch.Tensor, shard: torch.Tensor, classes: int) -> float:
    """Total variation distance between a shard's label distribution and uniform."""
    counts = torch.bincount(labels[shard], minlength=classes).double()
    share = counts / counts.sum()
    return 0.5 * float((share - 1.0 / classes).abs().sum())


@pytest.mark.parametrize(("scheme", "alpha"), SCHEMES)
def test_shards_are_disjoint(labels: torch.Tensor, scheme: str, alpha: float) -> None:
    shards = all_shards(labels, 5, scheme, alpha, seed=3)
    seen: set[int] = set()
    for shard in shards:
        members = set(shard.tolist())
        assert len(members) == len(shard), "a shard holds an index twice"
        assert not seen & members
        seen |= members


@pytest.mark.parametrize(("scheme", "alpha"), SCHEMES)
def test_shards_cover_every_index(labels: torch.Tensor, scheme: str, alpha: float) -> None:
    shards = all_shards(labels, 5, scheme, alpha, seed=3)
    covered = torch.cat(shards).sort().values
    assert torch.equal(covered, torch.arange(len(labels)))


@pytest.mark.parametrize(("scheme", "alpha"), SCHEMES)
def test_shards_are_int64_indices(labels: torch.Tensor, scheme: str, alpha: float) -> None:
    shard = shard_indices(labels, 0, 4, scheme, alpha, seed=0)
    assert shard.dtype == torch.int64 and shard.ndim == 1


@pytest.mark.parametrize(("scheme", "alpha"), SCHEMES)
def test_shards_are_deterministic_for_a_seed(
    labels: torch.Tensor, scheme: str, alpha: float
) -> None:
    first = all_shards(labels, 4, scheme, alpha, seed=11)
    again = all_shards(labels, 4, scheme, alpha, seed=11)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("scheme", "alpha"), SCHEMES)
def test_shards_differ_across_seeds(labels: torch.Tensor, scheme: str, alpha: float) -> None:
    one = shard_indices(labels, 0, 4, scheme, alpha, seed=1)
    two = shard_indices(labels, 0, 4, scheme, alpha, seed=2)
    assert not (len(one) == len(two) and torch.equal(one, two))


def test_iid_shards_have_near_equal_sizes(labels: torch.Tensor) -> None:
    sizes = [len(shard) for shard in all_shards(labels, 7, "iid", 0.5, seed=0)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(labels)


def test_iid_shards_are_close_to_uniform_in_labels(labels: torch.Tensor) -> None:
    for shard in all_shards(labels, 5, "iid", 0.5, seed=1):
        assert distance_from_uniform(labels, shard, 10) < 0.2


def test_dirichlet_with_small_alpha_skews_every_shard(labels: torch.Tensor) -> None:
    for shard in all_shards(labels, 5, "dirichlet", 0.1, seed=1):
        assert distance_from_uniform(labels, shard, 10) > 0.4


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_with_tiny_alpha_leaves_no_shard_empty(labels: torch.Tensor, seed: int) -> None:
    shards = all_shards(labels, 10, "dirichlet", 0.05, seed=seed)
    assert all(len(shard) > 0 for shard in shards)


def test_a_single_partition_is_the_whole_dataset(labels: torch.Tensor) -> None:
    shard = shard_indices(labels, 0, 1, "dirichlet", 0.1, seed=0)
    assert torch.equal(shard, torch.arange(len(labels)))


@pytest.mark.parametrize("index", [-1, 4, 100])
def test_index_outside_the_partitions_is_a_config_error(labels: torch.Tensor, index: int) -> None:
    with pytest.raises(ConfigError, match=str(index)):
        shard_indices(labels, index, 4)


def test_zero_partitions_is_a_config_error(labels: torch.Tensor) -> None:
    with pytest.raises(ConfigError):
        shard_indices(labels, 0, 0)


def test_more_partitions_than_examples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="partitions"):
        shard_indices(torch.tensor([0, 1, 0]), 0, 4)


def test_unknown_scheme_is_a_config_error(labels: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="pathological"):
        shard_indices(labels, 0, 2, scheme="pathological")


def test_dirichlet_that_cannot_fill_every_shard_is_a_config_error() -> None:
    # 3 examples of one class among 3 shards: with alpha this small, a draw almost never
    # gives each shard exactly one, so the retries run out.
    with pytest.raises(ConfigError, match="alpha"):
        shard_indices(torch.tensor([0, 0, 0]), 0, 3, "dirichlet", alpha=0.001, seed=0)
