"""The built-in task: image classification with cross-entropy (``--task classification``).

Its options are the settings users already know: ``model`` (cnn, a torchvision name or
``module:function``), ``dataset`` (digits, mnist, fashion-mnist, cifar10 or
``module:function``), ``data_dir``, ``download``, ``test_fraction``, ``partition`` and
``dirichlet_alpha``. Each client trains on its shard of the training split and evaluates
on its shard of the held-out split (same seeded split everywhere); the server evaluates
on the whole held-out split.

The round config (sent by the server every round) is validated before training:
``local_epochs``, ``batch_size``, ``learning_rate``, ``optimizer`` (sgd or adam),
``momentum``, ``weight_decay``, optionally ``max_steps`` and FedProx's ``proximal_mu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fedstream.common.data import Splits, load_dataset
from fedstream.common.errors import TaskError
from fedstream.common.messages import Scalar
from fedstream.common.models import build_model
from fedstream.common.partition import shard_indices
from fedstream.common.task import Context, Metrics, Partition, Task
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn


class TrainOptions(BaseModel):
    """The round config this task reads; anything else in the map is ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    local_epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1 << 20)
    learning_rate: float = Field(0.05, gt=0, le=1e3)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    max_steps: int | None = Field(None, ge=0)
    proximal_mu: float = Field(0.0, ge=0, le=1e6)

    @field_validator("learning_rate", "momentum", "weight_decay", "proximal_mu")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @classmethod
    def of(cls, config: Any) -> TrainOptions:
        try:
            return cls.model_validate(dict(config))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}"
                for e in error.errors()
            )
            raise TaskError(f"round config refused: {problems}") from None


@dataclass(frozen=True)
class ClassificationData:
    """One client's examples (or the server's test set): stored images and labels."""

    splits: Splits  # for ``prepare`` (normalisation) only
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class ClassificationTask(Task):  # type: ignore[misc]
    """Cross-entropy classification of images (N, C, H, W) into ``num_classes``."""

    def __init__(
        self,
        model: str = "cnn",
        dataset: str = "digits",
        data_dir: str | Path = "data",
        download: bool = False,
        seed: int = 0,
        test_fraction: float = 0.2,
        partition: str = "iid",
        dirichlet_alpha: float = 0.5,
    ) -> None:
        self.model_name = model
        self.dataset = dataset
        self.data_dir = Path(data_dir)
        self.download = download
        self.seed = seed
        self.test_fraction = test_fraction
        self.partition = partition
        self.dirichlet_alpha = dirichlet_alpha
        self._splits: Splits | None = None

    def options(self) -> dict[str, Scalar]:
        return {
            "model": self.model_name,
            "dataset": self.dataset,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "partition": self.partition,
            "dirichlet_alpha": self.dirichlet_alpha,
        }

    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = load_dataset(
                self.dataset, self.data_dir, self.download, self.seed, self.test_fraction
            )
        return self._splits

    def build_model(self) -> nn.Module:
        splits = self.splits()
        # build_model seeds torch itself; keep the caller's seed so that every process
        # builds the same initial weights.
        model: nn.Module = build_model(
            self.model_name, splits.input_shape, splits.num_classes, self.seed
        )
        return model

    def load_data(self, partition: Partition) -> ClassificationData:
        s = self.splits()
        train = shard_indices(
            s.train_y, partition.index, partition.count, self.partition, self.dirichlet_alpha,
            partition.seed,
        )
        # Each client's held-out shard for federated evaluation: an IID cut of the same
        # seeded held-out split the server evaluates on (fewer shards than clients when
        # the held-out split is tiny).
        count = min(partition.count, len(s.test_y))
        test = shard_indices(s.test_y, partition.index % count, count, "iid", 0.5, partition.seed)
        return ClassificationData(s, s.train_x[train], s.train_y[train], s.test_x[test],
                                  s.test_y[test])

    def server_data(self) -> ClassificationData:
        s = self.splits()
        empty_x, empty_y = s.train_x[:0], s.train_y[:0]
        return ClassificationData(s, empty_x, empty_y, s.test_x, s.test_y)

    def train(self, model: nn.Module, data: ClassificationData, ctx: Context) -> Metrics:
        return train_epochs(model, data, ctx, nn.CrossEntropyLoss())

    def evaluate(self, model: nn.Module, data: ClassificationData, ctx: Context) -> Metrics:
        return evaluate_split(model, data, ctx.device)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "adam":
        return torch.optim.Adam(
            parameters, lr=options.learning_rate, weight_decay=options.weight_decay
        )
    return torch.optim.SGD(
        parameters,
        lr=options.learning_rate,
        momentum=options.momentum,
        weight_decay=options.weight_decay,
    )


def train_epochs(
    model: nn.Module, data: ClassificationData, ctx: Context, loss_fn: nn.Module
) -> Metrics:
    """``local_epochs`` passes of mini-batch training over the client's shard.

    Stops early (keeping what it learnt) when ``ctx.should_stop()``: at the round's
    deadline or when the client is asked to stop. Adds FedProx's proximal term when the
    round config sets ``proximal_mu``.
    """
    options = TrainOptions.of(ctx.config)
    device = ctx.device
    model.to(device).train()
    optimizer = make_optimizer(model, options)
    # Dropout and friends draw from the global RNG: seeding it per call makes a round's
    # training a pure function of (global weights, client, round), so a round repeated
    # after a server restart trains exactly as it did the first time.
    torch.manual_seed(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    x, y = data.train_x, data.train_y
    if len(y) == 0:
        raise TaskError(f"partition {ctx.partition.index} holds no training examples")
    per_epoch = math.ceil(len(y) / options.batch_size)
    total_steps = per_epoch * options.local_epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    total_loss = torch.zeros((), device=device)
    steps = 0
    pin = device.type == "cuda"
    while steps < total_steps and not ctx.should_stop():
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), options.batch_size):
            if steps >= total_steps or ctx.should_stop():
                break
            index = order[start : start + options.batch_size]
            xb, yb = x[index], y[index]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = data.splits.prepare(xb.to(device, non_blocking=pin))
            yb = yb.to(device, non_blocking=pin)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            (loss + ctx.proximal_term(model)).backward()
            optimizer.step()
            total_loss += loss.detach()
            steps += 1
            ctx.progress(steps, total_steps)
    mean_loss = float(total_loss.item() / steps) if steps else 0.0
    return {"loss": mean_loss, "steps": steps, "num_examples": len(y)}


@torch.no_grad()
def evaluate_split(
    model: nn.Module, data: ClassificationData, device: torch.device, batch_size: int = 512
) -> Metrics:
    """Mean cross-entropy and accuracy of ``model`` on ``data``'s held-out examples."""
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data.test_y), batch_size):
        xb = data.splits.prepare(data.test_x[start : start + batch_size].to(device))
        yb = data.test_y[start : start + batch_size].to(device)
        logits = model(xb)
        total_loss += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    count = len(data.test_y)
    if count == 0:
        raise TaskError("no held-out examples to evaluate on")
    return {"loss": total_loss / count, "accuracy": correct / count, "num_examples": count}
