"""A client's local side of a round: load the global weights, train, compute the delta."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from fedstream.client.settings import ClientSettings
from fedstream.common.codec import Manifest
from fedstream.common.data import Splits, load_dataset
from fedstream.common.messages import RunSpec, TrainConfig, TrainReport
from fedstream.common.models import build_model
from fedstream.common.partition import shard_indices
from fedstream.common.training import train_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalUpdate:
    round: int
    delta: dict[str, torch.Tensor]
    num_examples: int
    report: TrainReport


class LocalTrainer:
    """Holds this client's data shard and model between rounds."""

    def __init__(
        self,
        settings: ClientSettings,
        run: RunSpec,
        assigned_partition: int,
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.device = device
        dataset = settings.dataset or run.dataset
        self.data: Splits = load_dataset(
            dataset, settings.data_dir, settings.download, run.seed, run.test_fraction
        )
        num = settings.num_partitions or run.num_partitions
        index = assigned_partition if settings.partition_index is None else settings.partition_index
        self.partition = (index, num)
        shard = shard_indices(
            self.data.train_y, index, num, run.partition, run.dirichlet_alpha, run.seed
        )
        self.x, self.y = self.data.train_x[shard], self.data.train_y[shard]
        self.model = build_model(run.model, self.data.input_shape, self.data.num_classes, run.seed)
        self.manifest = Manifest.of(self.model.state_dict())
        self.seed = run.seed * 1_000_003 + index
        log.info(
            "dataset %s: shard %d of %d, %d examples on %s",
            dataset,
            index,
            num,
            len(self.y),
            device,
        )

    def effective_config(self, config: TrainConfig) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            local_epochs=s.local_epochs or config.local_epochs,
            batch_size=s.batch_size or config.batch_size,
            learning_rate=s.learning_rate or config.learning_rate,
            optimizer=s.optimizer or config.optimizer,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            deadline_unix_s=config.deadline_unix_s,
        )

    def train_round(
        self, round_number: int, config: TrainConfig, global_state: dict[str, torch.Tensor]
    ) -> LocalUpdate:
        """Train from ``global_state`` and return delta = local - global (CPU tensors)."""
        self.model.load_state_dict(global_state)
        result = train_local(
            self.model,
            self.data,
            self.x,
            self.y,
            self.effective_config(config),
            self.device,
            seed=self.seed + round_number,
            max_steps=self.settings.max_steps,
        )
        local = self.model.state_dict()
        delta = {name: local[name].detach().cpu() - global_state[name] for name in global_state}
        report = TrainReport(
            train_loss=result.loss,
            steps=result.steps,
            train_started_unix_s=result.started_unix_s,
            train_finished_unix_s=result.finished_unix_s,
            device=str(self.device),
        )
        return LocalUpdate(round_number, delta, len(self.y), report)
