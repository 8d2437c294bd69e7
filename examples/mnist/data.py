"""MNIST from its IDX files, as a dataset function of your own.

``--dataset examples.mnist.data:idx_test_split --data-dir ../shared/data`` reads the
official MNIST *test* split (10,000 images; the training split is not needed) from
``<data_dir>/MNIST/raw`` with torchvision's IDX readers and cuts it into a training part
shared among the clients and a held-out part, with a fixed seed. Any dataset function is
called as ``function(data_dir=, download=, seed=, test_fraction=)`` and returns
``fedstream.common.data.Splits``: images (N, C, H, W) in their stored dtype, int64 labels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fedstream.common.data import Splits
from fedstream.common.errors import ConfigError

IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"


def idx_test_split(data_dir: Path, download: bool, seed: int, test_fraction: float) -> Splits:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = Path(data_dir) / "MNIST" / "raw"
    missing = [name for name in (IMAGES, LABELS) if not (raw / name).is_file()]
    if missing:
        raise ConfigError(
            f"MNIST IDX files {missing} not found in {raw.resolve()} (set --data-dir to the "
            "folder that holds MNIST/raw)"
        )
    images = read_image_file(str(raw / IMAGES)).unsqueeze(1)  # (10000, 1, 28, 28) uint8
    labels = read_label_file(str(raw / LABELS)).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return Splits(images[train], labels[train], images[test], labels[test], num_classes=10,
                  scale=1 / 255, mean=(0.1307,), std=(0.3081,))
