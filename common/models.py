"""Models by name: a small CNN for digit images, torchvision models, or a user's own.

``build_model`` is deterministic for a given seed, so a fresh model and a checkpoint's
state dict always have the same tensors in the same order.
"""

from __future__ import annotations

import torch
from fedstream.common.errors import ConfigError
from fedstream.common.plugins import is_import_path, load_callable
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head; fits 8x8 digits and 28x28 MNIST alike.

    BatchNorm is there on purpose: its running statistics and integer
    ``num_batches_tracked`` buffers travel and aggregate like any other tensor.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),  # (B, C, H, W) -> (B, w, H, W)
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),  # -> (B, 2w, H, W)
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> (B, 2w, H/2, W/2)
            nn.AdaptiveAvgPool2d(4),  # -> (B, 2w, 4, 4) whatever the input size
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes``."""
    torch.manual_seed(seed)
    if name == "cnn":
        return SmallCNN(in_channels=input_shape[0], num_classes=num_classes)
    if is_import_path(name):
        custom = load_callable(name)(input_shape=input_shape, num_classes=num_classes)
        if not isinstance(custom, nn.Module):
            raise ConfigError(f"{name!r} returned {type(custom).__name__}, not torch.nn.Module")
        return custom
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ConfigError(f"unknown model {name!r}: use cnn, a torchvision model or module:fn")
    if input_shape[0] != 3:
        raise ConfigError(
            f"torchvision model {name!r} expects 3-channel images, dataset has {input_shape[0]}"
        )
    vision_model: nn.Module = models.get_model(name, weights=None, num_classes=num_classes)
    return vision_model
