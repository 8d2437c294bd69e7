"""A training loop of your own on digits: gradient clipping and a learning-rate schedule
that runs across rounds, read from the round's config.

The server sends the schedule's settings in every round's config (``--round-config``):
``clip_norm`` (max gradient norm), ``lr_min`` (the floor of the cosine schedule) and
``total_rounds`` (its length). The learning rate of round r is the cosine schedule at r,
so it keeps falling across rounds even though each round builds a fresh optimizer.

    fl-local --task examples.custom_loop.task:ClippedDigits --clients 3 --rounds 10 -- \
        --round-config clip_norm=1.0 --round-config lr_min=0.005 --round-config total_rounds=10
"""

from __future__ import annotations

import math

import torch
from fedstream.common.task import Context
from fedstream.common.tasks.classification import ClassificationData, ClassificationTask
from torch import nn


def cosine_lr(base: float, floor: float, round_number: int, total_rounds: int) -> float:
    """Cosine decay from ``base`` at round 1 to ``floor`` at ``total_rounds``."""
    progress = min(1.0, (round_number - 1) / max(1, total_rounds - 1))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


class ClippedDigits(ClassificationTask):  # type: ignore[misc]
    """The built-in digits data and model, with this file's own training loop."""

    def train(self, model: nn.Module, data: ClassificationData, ctx: Context) -> dict[str, float]:
        config = ctx.config
        lr = cosine_lr(float(config.get("learning_rate", 0.05)), float(config.get("lr_min", 0.0)),
                       ctx.round, int(config.get("total_rounds", 1)))
        clip = float(config.get("clip_norm", 1.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(ctx.seed)
        model.to(ctx.device).train()
        total, steps, largest = 0.0, 0, 0.0
        for index in torch.randperm(len(data.train_y), generator=generator).split(32):
            if ctx.should_stop():
                break
            x = data.splits.prepare(data.train_x[index].to(ctx.device))
            loss = loss_fn(model(x), data.train_y[index].to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            total, steps, largest = total + loss.item(), steps + 1, max(largest, norm)
        return {"loss": total / max(1, steps), "lr": lr, "grad_norm_max": largest,
                "num_examples": len(data.train_y)}
