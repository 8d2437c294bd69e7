"""SCAFFOLD's control variates: the pure math, server and client side.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML, arXiv:1910.06378, Algorithm 1 with option II.
The server keeps a control variate ``c`` and each client i its own ``c_i`` (shapes of the
model). A client corrects every local gradient step by ``c - c_i`` (:func:`corrected_gradient`),
which removes the drift of local training on non-IID data, and after K local steps of
learning rate eta_l computes (:func:`client_control_update`)::

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)        (option II)
    upload  Delta y_i = y_i - x,  Delta c_i = c_i+ - c_i;  keep c_i = c_i+

The server averages both over the S clients of the round and, with N clients in all
(:meth:`ScaffoldServer.step`)::

    x <- x + eta_g * mean(Delta y_i)
    c <- c + (|S| / N) * mean(Delta c_i)

Carrying ``c`` to the clients and ``Delta c_i`` back needs a transfer of two named tensor
groups (weights and control variates); until the round plan carries those groups, SCAFFOLD
is not offered by ``build_strategy``. What is here is the math, tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from fedstream.server.strategies.base import StrategyError

State = Mapping[str, torch.Tensor]


def corrected_gradient(
    gradient: torch.Tensor, c_local: torch.Tensor, c_global: torch.Tensor
) -> torch.Tensor:
    """The client's local step direction: g_i(y) - c_i + c."""
    return gradient - c_local + c_global


def client_control_update(
    c_local: State,
    c_global: State,
    x_global: State,
    y_local: State,
    local_steps: int,
    local_lr: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Option II: (c_i+, Delta c_i) from the client's model after ``local_steps`` steps."""
    if local_steps < 1 or local_lr <= 0:
        raise StrategyError(
            f"scaffold: local_steps ({local_steps}) and local_lr ({local_lr}) must be positive"
        )
    scale = 1.0 / (local_steps * local_lr)
    new: dict[str, torch.Tensor] = {}
    change: dict[str, torch.Tensor] = {}
    for name, c_i in c_local.items():
        new[name] = c_i - c_global[name] + (x_global[name] - y_local[name]) * scale
        change[name] = new[name] - c_i
    return new, change


def mean_of(states: Sequence[State]) -> dict[str, torch.Tensor]:
    if not states:
        raise StrategyError("scaffold: a round needs at least one client's update")
    total = {name: tensor.clone() for name, tensor in states[0].items()}
    for state in states[1:]:
        for name, tensor in state.items():
            total[name].add_(tensor)
    return {name: tensor.div_(len(states)) for name, tensor in total.items()}


class ScaffoldServer:
    """The server's control variate ``c`` and its update; checkpointed with the model."""

    def __init__(self, total_clients: int, server_lr: float = 1.0) -> None:
        if total_clients < 1:
            raise StrategyError(f"scaffold: total_clients must be positive, got {total_clients}")
        self.total_clients = total_clients
        self.server_lr = server_lr
        self.control: dict[str, torch.Tensor] = {}

    def control_for(self, model: State) -> dict[str, torch.Tensor]:
        """The control variate to send with ``model`` (zeros before the first round)."""
        if not self.control:
            self.control = {
                name: torch.zeros_like(t) for name, t in model.items() if t.is_floating_point()
            }
        return self.control

    def step(
        self,
        model: MutableMapping[str, torch.Tensor],
        delta_ys: Sequence[State],
        delta_cs: Sequence[State],
    ) -> None:
        """x += eta_g mean(Delta y); c += |S|/N mean(Delta c), both in place."""
        if len(delta_ys) != len(delta_cs):
            raise StrategyError(
                f"scaffold: {len(delta_ys)} model deltas but {len(delta_cs)} control deltas"
            )
        if len(delta_ys) > self.total_clients:
            raise StrategyError(
                f"scaffold: {len(delta_ys)} clients in a round of a {self.total_clients}-client run"
            )
        control = self.control_for(model)
        mean_y, mean_c = mean_of(delta_ys), mean_of(delta_cs)
        for name, step in mean_y.items():
            model[name].add_(step.to(model[name].dtype), alpha=self.server_lr)
        share = len(delta_cs) / self.total_clients
        for name, step in mean_c.items():
            control[name].add_(step, alpha=share)

    def state_dict(self) -> dict[str, Any]:
        return {"total_clients": self.total_clients, "control": dict(self.control)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_clients = int(state["total_clients"])
        self.control = {name: tensor.clone() for name, tensor in state["control"].items()}
