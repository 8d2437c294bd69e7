"""Split a dataset among clients without the clients talking to each other.

Every client computes the same assignment from the labels and a shared seed, then keeps
shard ``index`` of ``num_partitions``, so shards are disjoint and together cover the data.

- ``iid``: a seeded permutation cut into near-equal shards.
- ``dirichlet``: label skew as in Hsu et al. 2019 (arXiv:1909.06335): for every class, the
  share each shard receives is drawn from Dirichlet(alpha); small alpha means each client
  sees few classes. Draws are repeated (seeded) until every shard has ``min_shard_size``
  examples, so no client is left with nothing to train on.
"""

from __future__ import annotations

import numpy as np
import torch
from fedstream.common.errors import ConfigError

MAX_DIRICHLET_DRAWS = 1000


def iid_shards(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(shard) for shard in np.array_split(order, num_partitions)]


def dirichlet_shards(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_shard_size: int = 1
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for shard, piece in zip(shards, np.split(members, cuts), strict=True):
                shard.append(piece)
        merged = [np.sort(np.concatenate(pieces)) for pieces in shards]
        if min(len(shard) for shard in merged) >= min_shard_size:
            return merged
    raise ConfigError(
        f"could not give each of {num_partitions} shards {min_shard_size} examples with "
        f"Dirichlet alpha={alpha}; raise alpha or use fewer partitions"
    )


def shard_indices(
    labels: torch.Tensor,
    index: int,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of the examples in shard ``index`` of ``num_partitions``."""
    if num_partitions < 1:
        raise ConfigError("num_partitions must be at least 1")
    if not 0 <= index < num_partitions:
        raise ConfigError(f"partition index {index} is outside 0..{num_partitions - 1}")
    if num_partitions > len(labels):
        raise ConfigError(f"{num_partitions} partitions for only {len(labels)} examples")
    if scheme == "iid":
        shards = iid_shards(len(labels), num_partitions, seed)
    elif scheme == "dirichlet":
        shards = dirichlet_shards(labels.numpy(), num_partitions, alpha, seed)
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r} (iid or dirichlet)")
    return torch.from_numpy(shards[index]).long()
