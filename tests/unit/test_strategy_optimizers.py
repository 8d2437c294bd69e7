"""Server optimizers: FedAvgM, FedAdam, FedYogi, FedAdagrad on hand-computed numbers, against
the papers' update rules written out in plain Python, and resumed from a checkpoint exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fedstream.server.strategies import StrategyError, build_strategy

from tests.unit.strategy_cases import (
    assert_equal_states,
    clone,
    mixed_deltas,
    run_round,
    uploads,
    zeros_like,
)


def one_client_round(
    name: str, options: dict[str, str], model: dict[str, torch.Tensor], deltas: list[list[float]]
) -> None:
    strategy = build_strategy(name, options)
    for number, delta in enumerate(deltas, start=1):
        run_round(
            strategy, model, uploads([{"w": torch.tensor(delta, dtype=torch.float64)}]), number
        )


def test_fedavgm_on_hand_computed_numbers() -> None:
    model = {"w": torch.tensor([0.0], dtype=torch.float64)}
    # beta 0.5, lr 1: v = 2, w = 2; then v = 0.5 * 2 + 1 = 2, w = 4; then v = 1 + 0 = 1, w = 5.
    one_client_round("fedavgm", {"momentum": "0.5", "server_lr": "1"}, model, [[2], [1], [0]])
    assert model["w"].item() == 5.0


def test_fedavgm_default_step_is_one_minus_momentum() -> None:
    model = {"w": torch.tensor([0.0], dtype=torch.float64)}
    one_client_round("fedavgm", {"momentum": "0.75"}, model, [[4]])
    assert model["w"].item() == 1.0  # lr 0.25 * v 4


def test_fedavgm_with_no_momentum_is_fedavg() -> None:
    deltas = mixed_deltas(3, seed=1)
    a, b = zeros_like(deltas[0]), zeros_like(deltas[0])
    run_round(build_strategy("fedavg", {"server_lr": "0.3"}), a, uploads(deltas))
    run_round(build_strategy("fedavgm", {"momentum": "0", "server_lr": "0.3"}), b, uploads(deltas))
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)


# beta1 0, beta2 0, tau 1 (v starts at 1), eta 1, one round with Delta = 3:
#   m = 3;  Adam: v = 9;  Yogi: v = 1 - 9 * sign(1 - 9) = 10;  Adagrad: v = 1 + 9 = 10
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedadam", 3 / (3 + 1)),
        ("fedyogi", 3 / (math.sqrt(10) + 1)),
        ("fedadagrad", 3 / (math.sqrt(10) + 1)),
    ],
)
def test_adaptive_first_step_on_hand_computed_numbers(name: str, expected: float) -> None:
    options = {"eta": "1", "beta1": "0", "tau": "1"}
    if name != "fedadagrad":
        options["beta2"] = "0"
    model = {"w": torch.tensor([0.0], dtype=torch.float64)}
    one_client_round(name, options, model, [[3]])
    assert model["w"].item() == pytest.approx(expected, rel=1e-12)


def paper_rule(
    rule: str, deltas: list[float], eta: float, beta1: float, beta2: float, tau: float
) -> float:
    """Reddi et al. 2021, Algorithm 2, on one coordinate, in plain floats."""
    x, m, v = 0.0, 0.0, tau * tau
    for delta in deltas:
        m = beta1 * m + (1 - beta1) * delta
        if rule == "fedadagrad":
            v = v + delta * delta
        elif rule == "fedadam":
            v = beta2 * v + (1 - beta2) * delta * delta
        else:
            v = v - (1 - beta2) * delta * delta * math.copysign(1.0, v - delta * delta)
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_rules_follow_algorithm_2_over_many_rounds(name: str) -> None:
    rounds = [0.5, -0.2, 0.1, 0.3, -0.4, 0.05]
    options = {"eta": "0.1", "beta1": "0.9", "tau": "0.001"}
    if name != "fedadagrad":
        options["beta2"] = "0.99"
    model = {"w": torch.tensor([0.0], dtype=torch.float64)}
    one_client_round(name, options, model, [[d] for d in rounds])
    want = paper_rule(name, rounds, 0.1, 0.9, 0.99, 0.001)
    assert model["w"].item() == pytest.approx(want, rel=1e-12)


def test_adaptive_rules_leave_integer_counters_to_the_plain_mean() -> None:
    model = {"w": torch.zeros(1), "n": torch.tensor(100)}
    strategy = build_strategy("fedadam")
    run_round(strategy, model, uploads([{"w": torch.ones(1), "n": torch.tensor(7)}]))
    assert model["n"].item() == 107
    assert set(strategy.state_dict()["optimizer"]["state"]) == {"w"}


def test_eta_l_is_sent_to_clients_as_their_learning_rate() -> None:
    configs = build_strategy("fedyogi", {"eta_l": "0.05"}).configure(1, ["a"], {"local_epochs": 1})
    assert configs == {"a": {"local_epochs": 1, "learning_rate": 0.05}}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavgm", {}),
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
        ("fedadam", {"dp_clip_norm": "0.5", "dp_noise_multiplier": "0.8", "dp_seed": "4"}),
    ],
)
def test_a_resumed_run_continues_exactly(
    name: str, options: dict[str, str], tmp_path: Path
) -> None:
    rounds = [mixed_deltas(3, seed=10 + r) for r in range(4)]
    straight = build_strategy(name, options)
    model = zeros_like(rounds[0][0])
    for number, deltas in enumerate(rounds, start=1):
        run_round(straight, model, uploads(deltas), number)

    first = build_strategy(name, options)
    resumed_model = zeros_like(rounds[0][0])
    for number, deltas in enumerate(rounds[:2], start=1):
        run_round(first, resumed_model, uploads(deltas), number)
    torch.save({"strategy": first.state_dict(), "model": resumed_model}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    second = build_strategy(name, options)
    second.load_state_dict(saved["strategy"])
    resumed_model = clone(saved["model"])
    for number, deltas in enumerate(rounds[2:], start=3):
        run_round(second, resumed_model, uploads(deltas), number)
    assert_equal_states(resumed_model, model)


def test_state_of_another_strategy_is_refused() -> None:
    state = build_strategy("fedadam").state_dict()
    with pytest.raises(StrategyError, match="strategy 'fedadam', this run uses 'fedyogi'"):
        build_strategy("fedyogi").load_state_dict(state)


def test_state_that_does_not_fit_the_model_is_refused_naming_the_tensor() -> None:
    small = {"w": torch.zeros(2)}
    strategy = build_strategy("fedadam")
    run_round(strategy, small, uploads([{"w": torch.ones(2)}]))
    other = build_strategy("fedadam")
    other.load_state_dict(strategy.state_dict())
    with pytest.raises(StrategyError, match="m of tensor 'w' is torch.float32\\[2\\]"):
        run_round(other, {"w": torch.zeros(3)}, uploads([{"w": torch.ones(3)}]), 2)
