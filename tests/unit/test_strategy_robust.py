"""Robust rules: hand-computed values, the block-wise path equal to the whole-tensor definition
bit for bit (on blocks that split tensors at odd places), bounded reads, order independence,
and a hostile client that poisons FedAvg but not these rules.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.server.strategies import InMemoryUpload, StrategyError, build_strategy
from fedstream.server.strategies.robust import (
    WORK_BYTES_PER_ELEMENT,
    Bulyan,
    KeptReduction,
    Krum,
    Median,
    RobustRule,
    TrimmedMean,
    blockwise_distances,
    bulyan_select,
    closest_to_median_mean,
    coordinate_median,
    krum_scores,
    reference,
    trimmed_mean,
)

from tests.unit.strategy_cases import mixed_deltas, run_round, uploads, zeros_like

COLUMN = torch.tensor([[1.0], [7.0], [3.0], [100.0]])  # four clients, one coordinate


def test_median_of_an_odd_count_is_the_middle_value() -> None:
    assert coordinate_median(COLUMN[:3]).tolist() == [3.0]


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    assert coordinate_median(COLUMN).tolist() == [5.0]  # (3 + 7) / 2


def test_median_is_taken_per_coordinate() -> None:
    stack = torch.tensor([[1.0, 9.0], [2.0, -5.0], [3.0, 0.0]])
    assert coordinate_median(stack).tolist() == [2.0, 0.0]


def test_trimmed_mean_drops_floor_beta_k_at_each_end() -> None:
    stack = torch.tensor([[1.0], [7.0], [3.0], [100.0], [-50.0]])
    assert trimmed_mean(stack, 0.2).tolist() == [pytest.approx(11 / 3)]  # drops -50, 100
    assert trimmed_mean(stack, 0.1).tolist() == [pytest.approx(61 / 5)]  # floor(0.5) = 0


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(StrategyError, match="beta=0.5 leaves nothing of 2 uploads"):
        trimmed_mean(torch.zeros(2, 1), 0.5)


def test_krum_scores_on_hand_computed_distances() -> None:
    # Points on a line: 0, 1, 2, 10, 30; f = 1: each score sums the 5 - 1 - 2 = 2 nearest.
    points = torch.tensor([0.0, 1.0, 2.0, 10.0, 30.0], dtype=torch.float64)
    distances = (points[:, None] - points[None, :]) ** 2
    scores = krum_scores(distances, 1, range(5))
    # 0: 1 + 4;  1: 1 + 1;  2: 1 + 4;  10: 64 + 81;  30: 400 + 784
    assert scores == [5.0, 2.0, 5.0, 145.0, 1184.0]


def krum_case() -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([x, 0.0])} for x in (0.0, 1.0, 2.0, 10.0, 30.0)]


def test_krum_keeps_the_best_scored_upload() -> None:
    result, selected = reference(Krum(1), list(zip("abcde", krum_case(), strict=True)))
    assert selected == ["b"]
    assert result["w"].tolist() == [1.0, 0.0]


def test_multi_krum_averages_the_m_best() -> None:
    result, selected = reference(
        Krum(1, 3, "multi-krum"), list(zip("abcde", krum_case(), strict=True))
    )
    assert selected == ["b", "a", "c"]  # ties (a, c both 5) go to the lower index
    assert result["w"].tolist() == [1.0, 0.0]  # (1 + 0 + 2) / 3


def test_multi_krum_default_m_is_k_minus_f() -> None:
    _, selected = reference(
        Krum(1, None, "multi-krum"), list(zip("abcde", krum_case(), strict=True))
    )
    assert selected == ["b", "a", "c", "d"]


def test_bulyan_selection_is_krum_repeated_without_the_chosen() -> None:
    points = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 50.0], dtype=torch.float64)
    distances = (points[:, None] - points[None, :]) ** 2
    # K = 7, f = 1: theta = 5 picks; the outlier 50 is never among them.
    chosen = bulyan_select(distances, 1, 5)
    assert 6 not in chosen and len(set(chosen)) == 5
    # First pick: neighbours 7 - 1 - 2 = 4; point 2 or 3 scores 1+1+4+4 = 10, lowest.
    assert chosen[0] == 2


def test_bulyan_coordinate_phase_averages_the_values_nearest_the_median() -> None:
    stack = torch.tensor([[0.0], [1.0], [2.0], [3.0], [40.0]])
    # median 2; keep 3 nearest: 2, 1, 3 -> 2
    assert closest_to_median_mean(stack, 3).tolist() == [2.0]


@pytest.mark.parametrize(
    ("rule", "count"),
    [(Krum(1), 4), (Krum(2, 1, "krum"), 6), (Bulyan(1), 6), (TrimmedMean(0.5), 4)],
)
def test_a_rule_refuses_too_few_uploads_naming_its_option(rule: RobustRule, count: int) -> None:
    with pytest.raises(StrategyError, match="option '(f|beta)'"):
        rule.check(count)


# ---- block-wise equals the whole-tensor definition ----------------------------------------


def reduce_blockwise(
    rule: RobustRule,
    deltas: list[dict[str, torch.Tensor]],
    block_elements: int,
    order: list[int] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Run the block-wise reduction; return the emitted delta, selection, largest read."""
    manifest = Manifest.of(deltas[0])
    staged = [RecordingUpload(f"c{i}", 1, delta) for i, delta in enumerate(deltas)]
    budget = block_elements * len(deltas) * WORK_BYTES_PER_ELEMENT
    reduction = KeptReduction(manifest, rule, budget)
    for index in order or range(len(staged)):
        reduction.take(staged[index], 1)
    pieces: dict[str, list[torch.Tensor]] = {}

    def apply(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        assert start == sum(p.numel() for p in pieces.get(spec.name, []))
        pieces.setdefault(spec.name, []).append(block.clone())

    info = reduction.reduce(apply)
    reduction.close()
    assert all(upload.released for upload in staged)
    assert reduction.block_elements == block_elements
    result = {name: torch.cat(parts) for name, parts in pieces.items()}
    largest = max(upload.largest for upload in staged)
    selected = info.get("selected", [f"c{i}" for i in range(len(deltas))])
    assert isinstance(selected, list)
    return result, selected, largest


class RecordingUpload(InMemoryUpload):
    largest = 0

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        self.largest = max(self.largest, count)
        return super().read(name, start, count)


RULES = {
    "median": lambda: Median(),
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "krum": lambda: Krum(1),
    "multi-krum": lambda: Krum(1, 3, "multi-krum"),
    "bulyan": lambda: Bulyan(1),
}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("count", [7, 8])
@pytest.mark.parametrize("block_elements", [1, 4, 11, 1000])
def test_blockwise_equals_the_whole_tensor_definition_bit_for_bit(
    name: str, count: int, block_elements: int
) -> None:
    deltas = mixed_deltas(count, seed=count * 31 + block_elements)
    want, want_selected = reference(RULES[name](), [(f"c{i}", d) for i, d in enumerate(deltas)])
    got, selected, largest = reduce_blockwise(RULES[name](), deltas, block_elements)
    assert selected == want_selected
    assert largest <= block_elements  # never more than one block of an upload at a time
    for tensor_name, tensor in want.items():
        if tensor.numel():
            assert torch.equal(got[tensor_name], tensor), tensor_name


def test_blockwise_distances_match_the_whole_vector_distances() -> None:
    deltas = mixed_deltas(5, seed=3)
    staged = [InMemoryUpload(f"c{i}", 1, d) for i, d in enumerate(deltas)]
    got = blockwise_distances(staged, Manifest.of(deltas[0]), 3)
    vectors = [
        torch.cat([t.reshape(-1).double() for t in d.values() if t.is_floating_point()])
        for d in deltas
    ]
    want = torch.stack([torch.stack([((a - b) ** 2).sum() for b in vectors]) for a in vectors])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("name", sorted(RULES))
def test_the_result_does_not_depend_on_arrival_order(name: str) -> None:
    deltas = mixed_deltas(7, seed=5)
    first, _, _ = reduce_blockwise(RULES[name](), deltas, 5)
    for order in itertools.islice(itertools.permutations(range(7)), 1, 200, 37):
        again, _, _ = reduce_blockwise(RULES[name](), deltas, 5, list(order))
        for tensor_name, tensor in first.items():
            assert torch.equal(again[tensor_name], tensor), (order, tensor_name)


# ---- a hostile client ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("median", {}),
        ("trimmed-mean", {"beta": "0.2"}),
        ("krum", {"f": "1"}),
        ("multi-krum", {"f": "1"}),
        ("bulyan", {"f": "1"}),
    ],
)
def test_a_hostile_upload_moves_fedavg_but_not_a_robust_rule(
    name: str, options: dict[str, str]
) -> None:
    gen = torch.Generator().manual_seed(0)
    honest = [{"w": 1.0 + 0.01 * torch.randn(50, generator=gen)} for _ in range(6)]
    hostile = {"w": -1e6 * torch.ones(50)}
    staged = [*honest, hostile]

    poisoned = zeros_like(honest[0])
    run_round(build_strategy("fedavg"), poisoned, uploads(staged))
    assert poisoned["w"].mean().item() < -1e5

    robust = zeros_like(honest[0])
    outcome = run_round(build_strategy(name, options), robust, uploads(staged))
    assert robust["w"].min().item() > 0.9 and robust["w"].max().item() < 1.1
    if "selected" in outcome.info:
        assert "c6" not in outcome.info["selected"]


def test_robust_strategies_ignore_claimed_weights() -> None:
    deltas = [{"w": torch.tensor([float(i)])} for i in range(5)]
    a, b = {"w": torch.zeros(1)}, {"w": torch.zeros(1)}
    run_round(build_strategy("median"), a, uploads(deltas, [1, 1, 1, 1, 1]))
    run_round(build_strategy("median"), b, uploads(deltas, [1, 1, 1, 1, 10**12]))
    assert a["w"].item() == b["w"].item() == 2.0


def test_too_few_uploads_for_krum_fails_the_round_and_changes_nothing() -> None:
    model = {"w": torch.zeros(2)}
    staged = uploads([{"w": torch.ones(2)} for _ in range(4)])
    with pytest.raises(StrategyError, match="krum with option 'f'=1 needs more than 4 uploads"):
        run_round(build_strategy("krum"), model, staged)
    assert model["w"].tolist() == [0.0, 0.0]
    assert all(upload.released for upload in staged)
