"""Federated regression on tabular data: scikit-learn's bundled diabetes data, an MLP, MSE.

Ten numeric features per patient, a float target (disease progression a year later).
Nothing here is an image or a class label: the task brings its own model, data, loss
and metrics. Each client standardises with statistics of the shared training split
(computed from the same seeded split on every machine, so nothing is exchanged for it).

    fl-local --task examples.regression.task:DiabetesTask --clients 3 --rounds 30
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from fedstream.common.task import Context, Partition, Task
from torch import nn


@dataclass(frozen=True)
class Table:
    train_x: torch.Tensor  # (N, 10) standardised features
    train_y: torch.Tensor  # (N,) standardised target
    test_x: torch.Tensor
    test_y: torch.Tensor
    y_std: float  # to report errors in the target's own units


class DiabetesTask(Task):  # type: ignore[misc]
    """MLP regression with mean squared error; metrics in the target's units."""

    def __init__(self, hidden: int = 64, test_fraction: float = 0.2, seed: int = 0) -> None:
        self.hidden = hidden
        self.test_fraction = test_fraction
        self.seed = seed

    def options(self) -> dict[str, int | float]:
        return {"hidden": self.hidden, "test_fraction": self.test_fraction, "seed": self.seed}

    def _table(self) -> Table:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_test = int(round(len(y) * self.test_fraction))
        test, train = order[:n_test], order[n_test:]
        mean, std = x[train].mean(0), x[train].std(0)
        y_mean, y_std = y[train].mean(), y[train].std()
        return Table((x[train] - mean) / std, (y[train] - y_mean) / y_std,
                     (x[test] - mean) / std, (y[test] - y_mean) / y_std, float(y_std))

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(10, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def load_data(self, partition: Partition) -> Table:
        table = self._table()
        # Contiguous slices of a shuffled split: disjoint shards, the same on every machine.
        def shard(n: int) -> slice:
            size = math.ceil(n / partition.count)
            return slice(partition.index * size, (partition.index + 1) * size)

        train, test = shard(len(table.train_y)), shard(len(table.test_y))
        return Table(table.train_x[train], table.train_y[train], table.test_x[test],
                     table.test_y[test], table.y_std)

    def server_data(self) -> Table:
        return self._table()

    def train(self, model: nn.Module, data: Table, ctx: Context) -> dict[str, float]:
        lr = float(ctx.config.get("learning_rate", 0.01))
        epochs = int(ctx.config.get("local_epochs", 1))
        batch = int(ctx.config.get("batch_size", 16))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(ctx.seed)
        model.train()
        total, steps = 0.0, 0
        for _ in range(epochs):
            for index in torch.randperm(len(data.train_y), generator=generator).split(batch):
                if ctx.should_stop():
                    break
                prediction = model(data.train_x[index]).squeeze(1)
                loss = nn.functional.mse_loss(prediction, data.train_y[index])
                optimizer.zero_grad()
                (loss + ctx.proximal_term(model)).backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
        mse = total / max(1, steps) * data.y_std**2
        return {"mse": mse, "num_examples": len(data.train_y)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Table, ctx: Context) -> dict[str, float]:
        model.eval()
        error = model(data.test_x).squeeze(1) - data.test_y
        return {
            "mse": float(error.pow(2).mean()) * data.y_std**2,
            "mae": float(error.abs().mean()) * data.y_std,
            "num_examples": len(data.test_y),
        }
