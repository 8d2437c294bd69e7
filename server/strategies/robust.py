"""Byzantine-robust rules over the staged uploads, block by block.

- Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran and Bartlett 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML,
  arXiv:1803.01498. The median of an even number of values is the mean of the two middle
  ones; the beta-trimmed mean drops the floor(beta * K) smallest and largest values of each
  coordinate and averages the rest.
- Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning
  with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS. With f Byzantine clients
  among K > 2f + 2, each upload's score is the sum of squared distances to its K - f - 2
  nearest others; Krum keeps the best-scored upload, Multi-Krum the m best and averages
  them (m = K - f unless set).
- Bulyan: El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed
  Learning in Byzantium", ICML, arXiv:1802.07927. With K >= 4f + 3, Krum is applied
  theta = K - 2f times, each time removing the chosen upload from the candidates; then each
  coordinate is the mean of the beta = theta - 2f selected values closest to their median.

Flower holds every client's whole update in memory before such a rule runs (O(K x model)).
Here the uploads stay where they were staged, in memory or on disk, and the close reads
the same block of every kept upload at a time, so the working memory is
O(K x block + K^2): a K x block stack (plus the sort's copies) and, for the Krum family,
the K x K matrix of squared distances, accumulated over the blocks in a first pass.
``block_memory_bytes`` bounds the stack: block = budget / (K x WORK_BYTES_PER_ELEMENT).

Every rule here is coordinate-wise or selects whole uploads, so the block-wise result is
exactly the whole-tensor result of :func:`reference` (the tests check this bit for bit on
blocks that split tensors at odd places). Uploads are ordered by client id before the
reduction and ties go to the lower index, so the result does not depend on the order in
which uploads arrived. Claimed example counts are ignored: a robust rule that weighted by
them would hand a liar the weight it claims.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.server.aggregate import accumulation_dtype
from fedstream.server.strategies.base import (
    ApplyBlock,
    Info,
    StagedUpload,
    StrategyError,
    iter_blocks,
)

# Bytes of working memory per element of a block per upload: the float64 stack, the
# sorted copy and its int64 indices, and Bulyan's distances to the median and their order.
WORK_BYTES_PER_ELEMENT = 64
DEFAULT_BLOCK_MEMORY_BYTES = 256 << 20


def block_elements_for(budget_bytes: int, num_uploads: int) -> int:
    """Elements per block so that K uploads' working set stays within ``budget_bytes``."""
    return max(1, budget_bytes // (max(1, num_uploads) * WORK_BYTES_PER_ELEMENT))


def stack_dtype(dtype: torch.dtype) -> torch.dtype:
    return accumulation_dtype(dtype) if dtype.is_floating_point else torch.float64


# ---- coordinate-wise reducers over a [K, B] stack ---------------------------------------


def row_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0, summed row by row in order: [K, B] -> [B].

    An explicit element-wise loop rather than ``rows.mean(0)``: its summation order is
    fixed, so a block gives exactly the values of the same columns of the whole tensor.
    """
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total.div_(rows.shape[0])


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """[K, B] -> [B]; for even K the mean of the two middle values."""
    count = stack.shape[0]
    ordered = stack.sort(dim=0).values
    if count % 2:
        return ordered[count // 2].clone()
    return row_mean(ordered[count // 2 - 1 : count // 2 + 1])


def trimmed_count(beta: float, count: int) -> int:
    """How many values the beta-trimmed mean drops at each end of K values."""
    return math.floor(beta * count)


def trimmed_mean(stack: torch.Tensor, beta: float) -> torch.Tensor:
    """[K, B] -> [B]: drop floor(beta K) values at each end of every coordinate, average."""
    count = stack.shape[0]
    cut = trimmed_count(beta, count)
    if 2 * cut >= count:
        raise StrategyError(f"trimmed mean with beta={beta} leaves nothing of {count} uploads")
    ordered = stack.sort(dim=0).values
    return row_mean(ordered[cut : count - cut])


def closest_to_median_mean(stack: torch.Tensor, keep: int) -> torch.Tensor:
    """[theta, B] -> [B]: per coordinate, the mean of the ``keep`` values nearest the median.

    Bulyan's second phase. Ties in distance go to the lower row (a stable sort).
    """
    median = coordinate_median(stack)
    order = (stack - median).abs_().argsort(dim=0, stable=True)[:keep]
    return row_mean(stack.gather(0, order))


# ---- Krum-family selection over a K x K matrix of squared distances -----------------------


def krum_scores(distances: torch.Tensor, f: int, members: Sequence[int]) -> list[float]:
    """Krum's score of each member: the sum of its n - f - 2 smallest squared distances.

    ``n`` is the number of members; at least one neighbour counts (Bulyan's last Krum
    passes run over 2f + 1 candidates, where n - f - 2 may be 0).
    """
    neighbours = max(1, len(members) - f - 2)
    index = torch.tensor(list(members), dtype=torch.long)
    scores = []
    for position, member in enumerate(members):
        others = torch.cat([index[:position], index[position + 1 :]])
        nearest = distances[member, others].sort().values[:neighbours]
        scores.append(float(nearest.sum()))
    return scores


def krum_select(distances: torch.Tensor, f: int, m: int) -> list[int]:
    """Indices of the ``m`` best-scored uploads (Multi-Krum; m = 1 is Krum), best first."""
    members = list(range(distances.shape[0]))
    scores = krum_scores(distances, f, members)
    return sorted(members, key=lambda i: (scores[i], i))[:m]


def bulyan_select(distances: torch.Tensor, f: int, theta: int) -> list[int]:
    """Bulyan's first phase: Krum ``theta`` times, each pick leaving the candidates."""
    remaining = list(range(distances.shape[0]))
    chosen: list[int] = []
    for _ in range(theta):
        scores = krum_scores(distances, f, remaining)
        best = min(range(len(remaining)), key=lambda p: (scores[p], remaining[p]))
        chosen.append(remaining.pop(best))
    return chosen


def accumulate_distances(distances: torch.Tensor, block: torch.Tensor) -> None:
    """Add the squared distances between the K rows of ``block`` [K, B] to [K, K]."""
    wide = block.to(torch.float64)
    for row in range(wide.shape[0]):
        difference = wide - wide[row]
        distances[row] += (difference * difference).sum(dim=1)


# ---- the rules -------------------------------------------------------------------------


class RobustRule(abc.ABC):
    """Which uploads count (optional) and how a [K, B] block of them is combined."""

    name: str
    needs_distances = False

    def check(self, count: int) -> None:  # noqa: B027 - most rules accept any K
        """Refuse a number of uploads the rule cannot be robust with."""

    def select(self, distances: torch.Tensor | None, count: int) -> list[int]:
        return list(range(count))

    @abc.abstractmethod
    def combine(self, stack: torch.Tensor, selected: int) -> torch.Tensor: ...


class Median(RobustRule):
    name = "median"

    def combine(self, stack: torch.Tensor, selected: int) -> torch.Tensor:
        return coordinate_median(stack)


class TrimmedMean(RobustRule):
    name = "trimmed-mean"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def check(self, count: int) -> None:
        if 2 * trimmed_count(self.beta, count) >= count:
            raise StrategyError(
                f"trimmed-mean: option 'beta'={self.beta} trims every one of {count} uploads"
            )

    def combine(self, stack: torch.Tensor, selected: int) -> torch.Tensor:
        return trimmed_mean(stack, self.beta)


class Krum(RobustRule):
    """Krum (m = 1) and Multi-Krum: average of the m best-scored uploads."""

    needs_distances = True

    def __init__(self, f: int, m: int | None = 1, name: str = "krum") -> None:
        self.f = f
        self.m = m
        self.name = name

    def check(self, count: int) -> None:
        if count <= 2 * self.f + 2:
            raise StrategyError(
                f"{self.name} with option 'f'={self.f} needs more than {2 * self.f + 2} "
                f"uploads, the round has {count}"
            )
        if self.m is not None and self.m > count:
            raise StrategyError(
                f"{self.name}: option 'm'={self.m} is more than the round's {count} uploads"
            )

    def select(self, distances: torch.Tensor | None, count: int) -> list[int]:
        assert distances is not None  # needs_distances
        return krum_select(distances, self.f, self.m if self.m is not None else count - self.f)

    def combine(self, stack: torch.Tensor, selected: int) -> torch.Tensor:
        return row_mean(stack)


class Bulyan(RobustRule):
    name = "bulyan"
    needs_distances = True

    def __init__(self, f: int) -> None:
        self.f = f

    def check(self, count: int) -> None:
        if count < 4 * self.f + 3:
            raise StrategyError(
                f"bulyan with option 'f'={self.f} needs at least {4 * self.f + 3} uploads, "
                f"the round has {count}"
            )

    def select(self, distances: torch.Tensor | None, count: int) -> list[int]:
        assert distances is not None  # needs_distances
        return bulyan_select(distances, self.f, count - 2 * self.f)

    def combine(self, stack: torch.Tensor, selected: int) -> torch.Tensor:
        return closest_to_median_mean(stack, selected - 2 * self.f)


# ---- block-wise reduction over staged uploads ---------------------------------------------


def read_stack(
    uploads: Sequence[StagedUpload], spec: TensorSpec, start: int, count: int
) -> torch.Tensor:
    """The same block of every upload, one row each: [K, count]."""
    stack = torch.empty(len(uploads), count, dtype=stack_dtype(spec.torch_dtype))
    for row, upload in zip(stack, uploads, strict=True):
        row.copy_(upload.read(spec.name, start, count))
    return stack


def blockwise_distances(
    uploads: Sequence[StagedUpload], manifest: Manifest, block_elements: int
) -> torch.Tensor:
    """[K, K] squared L2 distances over the floating-point tensors, one block at a time.

    Integer counters are left out: they measure how much a client trained, not where its
    model went, and would swamp the distances between weights.
    """
    distances = torch.zeros(len(uploads), len(uploads), dtype=torch.float64)
    for spec, start, count in iter_blocks(manifest, block_elements):
        if spec.torch_dtype.is_floating_point:
            accumulate_distances(distances, read_stack(uploads, spec, start, count))
    return distances


class KeptReduction:
    """Keeps every accepted upload staged; reduces them block by block at the close."""

    def __init__(self, manifest: Manifest, rule: RobustRule, block_memory_bytes: int) -> None:
        self.manifest = manifest
        self.rule = rule
        self.block_memory_bytes = block_memory_bytes
        self._kept: list[StagedUpload] = []
        self.block_elements = 0  # chosen at the close, from K

    def take(self, upload: StagedUpload, weight: int) -> bool:
        self._kept.append(upload)
        return True

    def reduce(self, apply: ApplyBlock) -> Info:
        uploads = sorted(self._kept, key=lambda upload: upload.client_id)
        self.rule.check(len(uploads))
        self.block_elements = block_elements_for(self.block_memory_bytes, len(uploads))
        distances = (
            blockwise_distances(uploads, self.manifest, self.block_elements)
            if self.rule.needs_distances
            else None
        )
        chosen = [uploads[i] for i in self.rule.select(distances, len(uploads))]
        for spec, start, count in iter_blocks(self.manifest, self.block_elements):
            stack = read_stack(chosen, spec, start, count)
            apply(spec, start, self.rule.combine(stack, len(chosen)))
        info: Info = {"block_elements": self.block_elements}
        if self.rule.needs_distances:
            info["selected"] = [upload.client_id for upload in chosen]
        return info

    def close(self) -> None:
        kept, self._kept = self._kept, []
        for upload in kept:
            upload.release()


def reference(
    rule: RobustRule, deltas: Sequence[tuple[str, Mapping[str, torch.Tensor]]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The rule's definition on whole in-memory tensors: (aggregate delta, selected ids).

    ``deltas`` are (client id, delta). Tensors come back flat, in the stack's wide dtype.
    O(K x model) memory: for tests, and as the definition the block-wise path must equal.
    """
    ordered = sorted(deltas, key=lambda item: item[0])
    rule.check(len(ordered))
    names = list(ordered[0][1])
    distances = None
    if rule.needs_distances:
        vectors = torch.stack(
            [
                torch.cat(
                    [
                        delta[name].reshape(-1).to(torch.float64)
                        for name in names
                        if delta[name].is_floating_point()
                    ]
                    or [torch.zeros(0, dtype=torch.float64)]
                )
                for _, delta in ordered
            ]
        )
        distances = torch.zeros(len(ordered), len(ordered), dtype=torch.float64)
        accumulate_distances(distances, vectors)
    chosen = [ordered[i] for i in rule.select(distances, len(ordered))]
    result = {}
    for name in names:
        wide = stack_dtype(ordered[0][1][name].dtype)
        stack = torch.stack([delta[name].reshape(-1).to(wide) for _, delta in chosen])
        result[name] = rule.combine(stack, len(chosen))
    return result, [client for client, _ in chosen]
