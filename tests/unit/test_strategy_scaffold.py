"""SCAFFOLD's control-variate math (Karimireddy et al. 2020, option II), by hand and on the
paper's motivating case: local steps on non-IID quadratics, where FedAvg drifts off the
optimum and SCAFFOLD's correction removes the drift.
"""

from __future__ import annotations

import pytest
import torch
from fedstream.server.strategies import StrategyError
from fedstream.server.strategies.scaffold import (
    ScaffoldServer,
    client_control_update,
    corrected_gradient,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_option_ii_control_update_by_hand() -> None:
    # c_i+ = c_i - c + (x - y_i) / (K eta_l) = 1 - 0.5 + (2 - 1.5) / (5 * 0.1) = 1.5
    new, change = client_control_update(
        {"w": t(1.0)}, {"w": t(0.5)}, {"w": t(2.0)}, {"w": t(1.5)}, 5, 0.1
    )
    assert new["w"].item() == pytest.approx(1.5)
    assert change["w"].item() == pytest.approx(0.5)


def test_corrected_gradient_is_g_minus_ci_plus_c() -> None:
    assert corrected_gradient(t(3.0), t(1.0), t(0.25)).tolist() == [2.25]


def test_server_step_by_hand() -> None:
    # x += 0.5 * mean([2, 4]) = 1.5;  c += (2 / 4) * mean([1, 3]) = 1
    server = ScaffoldServer(total_clients=4, server_lr=0.5)
    model = {"w": t(0.0)}
    server.step(model, [{"w": t(2.0)}, {"w": t(4.0)}], [{"w": t(1.0)}, {"w": t(3.0)}])
    assert model["w"].item() == 1.5
    assert server.control["w"].item() == 1.0


def test_server_refuses_mismatched_deltas() -> None:
    with pytest.raises(StrategyError, match="2 model deltas but 1 control deltas"):
        ScaffoldServer(4).step({"w": t(0.0)}, [{"w": t(1.0)}] * 2, [{"w": t(1.0)}])


def test_server_state_round_trips() -> None:
    server = ScaffoldServer(3)
    server.step({"w": t(0.0)}, [{"w": t(1.0)}], [{"w": t(6.0)}])
    again = ScaffoldServer(1)
    again.load_state_dict(server.state_dict())
    assert again.total_clients == 3 and again.control["w"].item() == 2.0


def federate(scaffold: bool, rounds: int = 300) -> float:
    """Two clients, f_i(w) = a_i / 2 (w - b_i)^2, 10 local steps; the optimum is 1.6."""
    a, b = [1.0, 4.0], [0.0, 2.0]
    steps, lr = 10, 0.1
    x = {"w": t(0.0)}
    server = ScaffoldServer(total_clients=2)
    controls = [{"w": t(0.0)}, {"w": t(0.0)}]
    for _ in range(rounds):
        c = server.control_for(x)
        delta_ys, delta_cs = [], []
        for i in range(2):
            y = x["w"].clone()
            for _ in range(steps):
                g = a[i] * (y - b[i])
                y = y - lr * (corrected_gradient(g, controls[i]["w"], c["w"]) if scaffold else g)
            new, change = client_control_update(controls[i], c, x, {"w": y}, steps, lr)
            if scaffold:
                controls[i] = new
            delta_ys.append({"w": y - x["w"]})
            delta_cs.append(change if scaffold else {"w": t(0.0)})
        server.step(x, delta_ys, delta_cs)
    return x["w"].item()


def test_scaffold_reaches_the_optimum_where_fedavg_drifts() -> None:
    optimum = (1.0 * 0.0 + 4.0 * 2.0) / (1.0 + 4.0)
    assert federate(scaffold=True) == pytest.approx(optimum, abs=1e-6)
    assert abs(federate(scaffold=False) - optimum) > 0.1
