"""FedAvg: the pure function on hand-computed numbers, and the accumulator against it.

Expected values below are worked out by hand from sum_k n_k * delta_k / sum_k n_k, so a
mistake in the weighting (or a plain mean) shows up as a wrong number, not a tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest
import torch
from fedstream.common.codec import Manifest
from fedstream.server.aggregate import DeltaAccumulator, apply_delta, fedavg

# Two clients: A trained on 1 example, B on 3.
DELTA_A = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
DELTA_B = {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(21)}


def random_deltas(
    count: int, seed: int
) -> tuple[Manifest, list[tuple[dict[str, torch.Tensor], int]]]:
    """``count`` deltas of a small model with float32, half, integer and scalar tensors."""
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(count):
        delta = {
            "conv.weight": torch.randn(4, 1, 3, 3, generator=gen),
            "conv.bias": torch.randn(4, generator=gen),
            "half": torch.randn(6, generator=gen).half(),
            "brain": torch.randn(5, generator=gen).bfloat16(),
            "bn.num_batches_tracked": torch.randint(0, 50, (), generator=gen),
            "scale": torch.randn((), generator=gen, dtype=torch.float64),
        }
        weight = int(torch.randint(1, 100, (), generator=gen))
        deltas.append((delta, weight))
    return Manifest.of(deltas[0][0]), deltas


def copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()}


# ---- the pure function ------------------------------------------------------------------


def test_fedavg_weights_each_delta_by_its_examples() -> None:
    result = fedavg([(DELTA_A, 1), (DELTA_B, 3)])
    # w[0] = (1*1 + 3*5) / 4 = 16/4 = 4;  w[1] = (1*2 + 3*-2) / 4 = -4/4 = -1
    torch.testing.assert_close(result["w"], torch.tensor([4.0, -1.0]))


def test_fedavg_is_not_a_plain_mean() -> None:
    result = fedavg([(DELTA_A, 1), (DELTA_B, 3)])
    plain_mean = torch.tensor([3.0, 0.0])  # (1+5)/2, (2-2)/2
    assert not torch.allclose(result["w"], plain_mean)


def test_fedavg_with_equal_weights_is_the_mean() -> None:
    result = fedavg([(DELTA_A, 7), (DELTA_B, 7)])
    torch.testing.assert_close(result["w"], torch.tensor([3.0, 0.0]))


def test_fedavg_of_one_client_is_its_delta() -> None:
    result = fedavg([(DELTA_B, 5)])
    torch.testing.assert_close(result["w"], DELTA_B["w"])
    assert result["n"].item() == 21


def test_fedavg_rounds_integer_buffers_back_to_int64() -> None:
    result = fedavg([(DELTA_A, 1), (DELTA_B, 3)])
    # (1*10 + 3*21) / 4 = 73/4 = 18.25 -> 18
    assert result["n"].dtype == torch.int64
    assert result["n"].shape == ()
    assert result["n"].item() == 18


def test_fedavg_rounds_integer_buffers_to_nearest_not_down() -> None:
    result = fedavg([({"n": torch.tensor([1, 0])}, 1), ({"n": torch.tensor([2, 1])}, 3)])
    # (1 + 6) / 4 = 1.75 -> 2;  (0 + 3) / 4 = 0.75 -> 1
    assert result["n"].tolist() == [2, 1]


def test_fedavg_keeps_float16_dtype() -> None:
    a = {"h": torch.tensor([0.5, 1.0], dtype=torch.float16)}
    b = {"h": torch.tensor([1.5, -1.0], dtype=torch.float16)}
    result = fedavg([(a, 1), (b, 3)])
    # (0.5 + 4.5) / 4 = 1.25;  (1 - 3) / 4 = -0.5 (both exact in float16)
    assert result["h"].dtype == torch.float16
    assert result["h"].tolist() == [1.25, -0.5]


def test_fedavg_keeps_bfloat16_dtype() -> None:
    a = {"b": torch.tensor([2.0, -8.0], dtype=torch.bfloat16)}
    b = {"b": torch.tensor([4.0, 0.0], dtype=torch.bfloat16)}
    result = fedavg([(a, 1), (b, 3)])
    # (2 + 12) / 4 = 3.5;  (-8 + 0) / 4 = -2
    assert result["b"].dtype == torch.bfloat16
    assert result["b"].tolist() == [3.5, -2.0]


def test_fedavg_weighting_of_float16_does_not_overflow() -> None:
    # 3 * 60000 = 180000 is beyond float16's 65504; the sum must be kept wider.
    a = {"h": torch.tensor([60000.0], dtype=torch.float16)}
    b = {"h": torch.tensor([60000.0], dtype=torch.float16)}
    result = fedavg([(a, 1), (b, 3)])
    assert result["h"].item() == 60000.0


def test_fedavg_of_bool_buffers_is_the_weighted_majority() -> None:
    a = {"flag": torch.tensor([True, True])}
    b = {"flag": torch.tensor([False, True])}
    result = fedavg([(a, 1), (b, 3)])
    # weighted share of True: 1/4 and 4/4
    assert result["flag"].dtype == torch.bool
    assert result["flag"].tolist() == [False, True]


def test_fedavg_refuses_no_deltas() -> None:
    with pytest.raises(ValueError):
        fedavg([])


def test_fedavg_refuses_zero_total_examples() -> None:
    with pytest.raises(ValueError):
        fedavg([(DELTA_A, 0)])


def test_apply_delta_scales_float_step_by_server_lr() -> None:
    global_state = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(100)}
    step = {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(18)}
    updated = apply_delta(global_state, step, 0.5)
    # 1 + 0.5*4 = 3;  1 + 0.5*-1 = 0.5; counters add unscaled: 100 + 18
    torch.testing.assert_close(updated["w"], torch.tensor([3.0, 0.5]))
    assert updated["n"].item() == 118


# ---- the accumulator --------------------------------------------------------------------


def test_accumulator_on_the_hand_computed_example() -> None:
    accumulator = DeltaAccumulator(Manifest.of(DELTA_A))
    accumulator.fold_state(DELTA_A, 1)
    accumulator.fold_state(DELTA_B, 3)
    average = accumulator.average()
    torch.testing.assert_close(average["w"], torch.tensor([4.0, -1.0]))
    assert average["n"].dtype == torch.int64 and average["n"].item() == 18
    assert accumulator.total_weight == 4 and accumulator.num_folded == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulator_equals_fedavg_for_random_deltas(seed: int) -> None:
    manifest, deltas = random_deltas(5, seed)
    accumulator = DeltaAccumulator(manifest)
    for delta, weight in deltas:
        accumulator.fold_state(delta, weight)
    expected = fedavg(deltas)
    average = accumulator.average()
    assert list(average) == list(expected)
    for name in expected:
        assert average[name].shape == expected[name].shape, name
        torch.testing.assert_close(average[name], expected[name], msg=name)


def test_accumulator_folding_in_slices_equals_folding_whole_tensors() -> None:
    manifest, deltas = random_deltas(3, seed=4)
    whole = DeltaAccumulator(manifest)
    sliced = DeltaAccumulator(manifest)
    for delta, weight in deltas:
        whole.fold_state(delta, weight)
        for name, tensor in delta.items():
            flat = tensor.reshape(-1)
            # Uneven slices: 1 element, then up to 7, then the rest.
            bounds = sorted({0, min(1, flat.numel()), min(8, flat.numel()), flat.numel()})
            for start, end in itertools.pairwise(bounds):
                sliced.fold(name, start, flat[start:end], weight)
        sliced.commit(weight)
    for name, tensor in whole.average().items():
        torch.testing.assert_close(sliced.average()[name], tensor, msg=name)


def test_accumulator_refuses_a_slice_past_the_end_of_a_tensor() -> None:
    accumulator = DeltaAccumulator(Manifest.of({"w": torch.zeros(4)}))
    with pytest.raises(ValueError, match="'w'"):
        accumulator.fold("w", 3, torch.ones(2), 1)


def test_accumulator_average_keeps_shapes_and_dtypes() -> None:
    manifest, deltas = random_deltas(2, seed=5)
    accumulator = DeltaAccumulator(manifest)
    for delta, weight in deltas:
        accumulator.fold_state(delta, weight)
    for spec in manifest.specs:
        tensor = accumulator.average()[spec.name]
        assert tuple(tensor.shape) == spec.shape
        assert tensor.dtype == spec.torch_dtype


def test_accumulator_refuses_to_average_nothing() -> None:
    accumulator = DeltaAccumulator(Manifest.of(DELTA_A))
    with pytest.raises(ValueError):
        accumulator.average()


def test_apply_to_on_the_hand_computed_example() -> None:
    accumulator = DeltaAccumulator(Manifest.of(DELTA_A))
    accumulator.fold_state(DELTA_A, 1)
    accumulator.fold_state(DELTA_B, 3)
    global_state = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(100)}
    accumulator.apply_to(global_state, server_lr=0.5)
    # average [4, -1] and 18:  w = 1 + 0.5*[4, -1] = [3, 0.5];  n = 100 + 18
    torch.testing.assert_close(global_state["w"], torch.tensor([3.0, 0.5]))
    assert global_state["n"].item() == 118


@pytest.mark.parametrize("server_lr", [1.0, 0.3, 2.0])
def test_apply_to_equals_global_plus_server_lr_times_fedavg(server_lr: float) -> None:
    manifest, deltas = random_deltas(4, seed=6)
    gen = torch.Generator().manual_seed(7)
    global_state = {
        name: (torch.randn(tensor.shape, generator=gen) * 5).to(tensor.dtype)
        for name, tensor in deltas[0][0].items()
    }
    expected = apply_delta(global_state, fedavg(deltas), server_lr)
    accumulator = DeltaAccumulator(manifest)
    for delta, weight in deltas:
        accumulator.fold_state(delta, weight)
    updated = copy(global_state)
    accumulator.apply_to(updated, server_lr)
    for name in expected:
        assert updated[name].dtype == global_state[name].dtype, name
        torch.testing.assert_close(updated[name], expected[name], msg=name)


def test_folding_order_does_not_change_the_average() -> None:
    manifest, deltas = random_deltas(4, seed=8)
    averages = []
    for order in itertools.permutations(range(len(deltas))):
        accumulator = DeltaAccumulator(manifest)
        for index in order:
            accumulator.fold_state(*deltas[index])
        averages.append(accumulator.average())
    for average in averages[1:]:
        for name, tensor in averages[0].items():
            torch.testing.assert_close(average[name], tensor, msg=name)


def test_two_client_sum_is_bit_identical_in_either_arrival_order() -> None:
    # A fused multiply-add would round differently depending on which delta came first;
    # the accumulator's multiply-then-add makes a resumed run reproduce a clean one.
    generator = torch.Generator().manual_seed(7)
    a, b = (torch.randn(10_000, generator=generator) for _ in range(2))
    manifest = Manifest.of({"w": a})
    forward, backward = DeltaAccumulator(manifest), DeltaAccumulator(manifest)
    forward.fold_state({"w": a}, 359)
    forward.fold_state({"w": b}, 1021)
    backward.fold_state({"w": b}, 1021)
    backward.fold_state({"w": a}, 359)
    assert torch.equal(forward.average()["w"], backward.average()["w"])


def test_negative_offset_is_refused() -> None:
    accumulator = DeltaAccumulator(Manifest.of({"w": torch.zeros(4)}))
    with pytest.raises(ValueError, match="negative offset"):
        accumulator.fold("w", -3, torch.ones(2), 1)



@pytest.mark.parametrize(
    ("dtype", "weight", "delta", "server_lr"),
    [
        (torch.float32, 1.0, 1e38, 10.0),  # a finite average whose step overflows float32
        (torch.float16, 60000.0, 60000.0, 1.0),  # float16 weights: 60000 + 60000 is inf
    ],
)
def test_apply_to_refuses_a_non_finite_result_and_writes_nothing(
    dtype: torch.dtype, weight: float, delta: float, server_lr: float
) -> None:
    from fedstream.common.errors import AggregateError

    # The bad tensor comes last, so a one-pass apply would already have changed "first".
    global_state = {
        "first": torch.ones(3),
        "counter": torch.tensor(4),
        "last": torch.full((5,), weight, dtype=dtype),
    }
    before = {name: tensor.clone() for name, tensor in global_state.items()}
    step = {
        "first": torch.ones(3),
        "counter": torch.tensor(1),
        "last": torch.full((5,), delta, dtype=dtype),
    }
    accumulator = DeltaAccumulator(Manifest.of(global_state))
    accumulator.fold_state(step, 2)
    with pytest.raises(AggregateError, match="'last': the updated weights would not be finite"):
        accumulator.apply_to(global_state, server_lr)
    torch.testing.assert_close(global_state, before, rtol=0, atol=0)
