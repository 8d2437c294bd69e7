"""Local training and evaluation loops (plain PyTorch, run off the event loop)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from fedstream.common.data import Splits
from fedstream.common.messages import TrainConfig
from torch import nn


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    started_unix_s: float
    finished_unix_s: float


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def train_local(
    model: nn.Module,
    data: Splits,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    seed: int,
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.local_epochs`` epochs over (x, y).

    Returns the mean training loss over the steps taken. ``max_steps=0`` trains nothing
    (transport benchmarks and smoke tests); None means no limit.
    """
    started = time.time()
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    # Dropout and friends draw from the global RNG: seeding it per call makes a round's
    # training a pure function of (global weights, client, round), so a round repeated
    # after a server restart trains exactly as it did the first time.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    total_loss = torch.zeros((), device=device)
    steps = 0
    pin = device.type == "cuda"
    for _ in range(config.local_epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), config.batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            index = order[start : start + config.batch_size]
            xb, yb = x[index], y[index]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = data.prepare(xb.to(device, non_blocking=pin))
            yb = yb.to(device, non_blocking=pin)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            steps += 1
    mean_loss = float(total_loss.item() / steps) if steps else 0.0
    return TrainResult(mean_loss, steps, started, time.time())


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Splits, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on the held-out split."""
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data.test_y), batch_size):
        xb = data.prepare(data.test_x[start : start + batch_size].to(device))
        yb = data.test_y[start : start + batch_size].to(device)
        logits = model(xb)
        total_loss += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    count = max(1, len(data.test_y))
    return total_loss / count, correct / count
