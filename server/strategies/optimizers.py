"""Server optimizers: how the round's aggregate delta moves the global model.

The aggregate delta Delta_t (the clients' average of ``local - global``, or a robust
estimate of it) is a pseudo-gradient pointing downhill; a server optimizer takes a step
along it. Every optimizer here works element by element, so it is applied one block of
one tensor at a time as the reduction emits it, and its state (momentum, second moment)
is one flat tensor per floating-point model tensor.

- :class:`ServerSGD`: ``x += eta * Delta`` (FedAvg with a server learning rate; eta = 1 is
  McMahan et al. 2017, arXiv:1602.05629).
- :class:`ServerMomentum`: FedAvgM, Hsu, Qi and Brown 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification",
  arXiv:1909.06335: ``v = beta * v + Delta; x += eta * v``.
- :class:`ServerAdaptive`: FedAdagrad, FedAdam and FedYogi, Reddi et al. 2021, "Adaptive
  Federated Optimization", ICLR, arXiv:2003.00295, Algorithm 2::

      m = beta1 * m + (1 - beta1) * Delta
      v = v + Delta^2                                        (FedAdagrad)
      v = beta2 * v + (1 - beta2) * Delta^2                  (FedAdam)
      v = v - (1 - beta2) * Delta^2 * sign(v - Delta^2)      (FedYogi)
      x = x + eta * m / (sqrt(v) + tau)

  with ``m`` starting at 0 and ``v`` at tau^2 (the paper's v_{-1} >= tau^2), and, as in
  the paper, no bias correction.

Integer and boolean tensors (BatchNorm's ``num_batches_tracked``) are counters, not
parameters: every optimizer adds their averaged step unscaled and keeps no state for them.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from typing import Any

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.server.aggregate import _cast_back, accumulation_dtype
from fedstream.server.strategies.base import StrategyError


class ServerOptimizer(abc.ABC):
    """Applies one block of the aggregate delta to the matching block of the model."""

    kind: str

    def __init__(self) -> None:
        self.steps = 0
        # Per floating tensor, named slots ("m", "v", ...) of flat state tensors.
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] | None = None

    slots: tuple[str, ...] = ()

    def _initial(self, slot: str, spec: TensorSpec) -> torch.Tensor:
        return torch.zeros(spec.numel, dtype=accumulation_dtype(spec.torch_dtype))

    def prepare(self, manifest: Manifest) -> None:
        """Create the state for ``manifest`` (first round) or check the loaded state fits."""
        if not self.slots:
            return
        floating = [spec for spec in manifest.specs if spec.torch_dtype.is_floating_point]
        if self._loaded is not None:
            self._state = self._checked(self._loaded, floating)
            self._loaded = None
        elif not self._state:
            self._state = {
                spec.name: {slot: self._initial(slot, spec) for slot in self.slots}
                for spec in floating
            }

    def _checked(
        self, loaded: Mapping[str, Mapping[str, torch.Tensor]], floating: list[TensorSpec]
    ) -> dict[str, dict[str, torch.Tensor]]:
        where = f"checkpoint's {self.kind} optimizer state"
        names = {spec.name for spec in floating}
        if set(loaded) != names:
            missing, unexpected = sorted(names - set(loaded)), sorted(set(loaded) - names)
            raise StrategyError(
                f"{where} does not fit the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        state: dict[str, dict[str, torch.Tensor]] = {}
        for spec in floating:
            slots = loaded[spec.name]
            if set(slots) != set(self.slots):
                raise StrategyError(f"{where}: tensor {spec.name!r} has slots {sorted(slots)}")
            wide = accumulation_dtype(spec.torch_dtype)
            for slot, tensor in slots.items():
                if tensor.dtype != wide or tensor.shape != (spec.numel,):
                    raise StrategyError(
                        f"{where}: {slot} of tensor {spec.name!r} is {tensor.dtype}"
                        f"{list(tensor.shape)}, the model needs {wide}[{spec.numel}]"
                    )
            state[spec.name] = {slot: slots[slot].clone() for slot in self.slots}
        return state

    def apply(self, spec: TensorSpec, start: int, target: torch.Tensor, step: torch.Tensor) -> None:
        """Move ``target`` (elements [start, ...) of model tensor ``spec``) by ``step``."""
        if not target.is_floating_point():
            # Counters such as num_batches_tracked: scaling an integer step is meaningless.
            target.add_(_cast_back(step, target.dtype))
            return
        end = start + step.numel()
        state = {slot: self._state[spec.name][slot][start:end] for slot in self.slots}
        self._apply(target, step, state)

    @abc.abstractmethod
    def _apply(
        self, target: torch.Tensor, step: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> None: ...

    def finish_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "steps": self.steps,
            "state": {name: dict(slots) for name, slots in self._state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise StrategyError(
                f"checkpoint holds a {state.get('kind')!r} server optimizer, this run uses "
                f"{self.kind!r}"
            )
        self.steps = int(state["steps"])
        # Checked against the model at the next prepare(), when the manifest is known.
        self._loaded = {name: dict(slots) for name, slots in state["state"].items()}
        self._state = {}


class ServerSGD(ServerOptimizer):
    """``x += lr * Delta``: exactly today's FedAvg step (DeltaAccumulator.apply_to)."""

    kind = "sgd"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = lr

    def _apply(
        self, target: torch.Tensor, step: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> None:
        target.add_(_cast_back(step, target.dtype), alpha=self.lr)


class ServerMomentum(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019, arXiv:1909.06335): ``v = beta v + Delta; x += lr v``."""

    kind = "momentum"
    slots = ("v",)

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum

    def _apply(
        self, target: torch.Tensor, step: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> None:
        velocity = state["v"]
        velocity.mul_(self.momentum).add_(step.to(velocity.dtype))
        target.add_(velocity.to(target.dtype), alpha=self.lr)


class Adaptivity(enum.Enum):
    """The second-moment rule of Reddi et al. 2021, Algorithm 2."""

    ADAGRAD = "adagrad"
    ADAM = "adam"
    YOGI = "yogi"


class ServerAdaptive(ServerOptimizer):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2)."""

    slots = ("m", "v")

    def __init__(
        self, rule: Adaptivity, eta: float, beta1: float, beta2: float, tau: float
    ) -> None:
        super().__init__()
        self.rule = rule
        self.kind = f"fed{rule.value}"
        self.eta = eta
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def _initial(self, slot: str, spec: TensorSpec) -> torch.Tensor:
        initial = super()._initial(slot, spec)
        if slot == "v":
            initial.fill_(self.tau**2)
        return initial

    def _apply(
        self, target: torch.Tensor, step: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> None:
        m, v = state["m"], state["v"]
        delta = step.to(m.dtype)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        square = delta * delta
        if self.rule is Adaptivity.ADAGRAD:
            v.add_(square)
        elif self.rule is Adaptivity.ADAM:
            v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        else:
            v.sub_(square * torch.sign(v - square), alpha=1 - self.beta2)
        update = v.sqrt().add_(self.tau)
        torch.div(m, update, out=update)
        target.add_(update.to(target.dtype), alpha=self.eta)
