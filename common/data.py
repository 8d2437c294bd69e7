"""Datasets as in-memory tensors: a training part shared among clients, a held-out part.

Built in: ``digits`` (scikit-learn's bundled 8x8 handwritten digits, no download),
``mnist``, ``fashion-mnist`` and ``cifar10`` (torchvision's loaders, reading the official
files from ``data_dir`` and downloading them there when allowed). A user's own dataset is
named by import path ``package.module:function``; the function is called as
``function(data_dir=Path, download=bool, seed=int, test_fraction=float)`` and returns a
:class:`Splits`.

Images are kept in their stored dtype (uint8 for the torchvision sets) and normalised
per batch by :meth:`Splits.prepare`, so a CIFAR-10 client holds 150 MB, not 600 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from fedstream.common.errors import ConfigError
from fedstream.common.plugins import is_import_path, load_callable

BUILTIN = ("digits", "mnist", "fashion-mnist", "cifar10")


@dataclass(frozen=True)
class Splits:
    """Training and held-out examples. Images are (N, C, H, W); labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    scale: float = 1.0  # multiply stored values by this first (1/255 for uint8 images)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Stored values -> normalised float32 inputs, one batch at a time."""
        channels = batch.shape[1]
        mean = (
            torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        )
        std = (
            torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        )
        return (batch.float() * self.scale - mean) / std


def _split(
    x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return x[train], y[train], x[test], y[test]


def load_digits(seed: int, test_fraction: float) -> Splits:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train_x, train_y, test_x, test_y = _split(x, y, seed, test_fraction)
    return Splits(train_x, train_y, test_x, test_y, 10, scale=1 / 16, mean=(0.3,), std=(0.4,))


# The files torchvision's loaders read, per dataset (under data_dir).
EXPECTED_FILES = {
    "mnist": [f"MNIST/raw/{n}" for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "fashion-mnist": [f"FashionMNIST/raw/{n}" for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "cifar10": [f"cifar-10-batches-py/{n}" for n in (
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "test_batch")],
}


def missing_files(name: str, root: Path) -> list[str]:
    """The files of ``name`` that are not under ``root`` (MNIST's may be gzipped)."""
    return [
        relative for relative in EXPECTED_FILES[name]
        if not (root / relative).is_file() and not (root / f"{relative}.gz").is_file()
    ]


def _torchvision_set(name: str, root: Path, train: bool, download: bool) -> object:
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }[name]
    missing = missing_files(name, root)
    if missing and not download:
        raise ConfigError(
            f"dataset {name!r}: {len(missing)} of its files are not in {root.resolve()}: "
            f"{', '.join(missing)}. Copy them there, or pass --download on a machine that "
            "can reach the internet (only the test split? use a dataset function, see "
            "examples/mnist)"
        )
    try:
        return cls(root=str(root), train=train, download=download)
    except RuntimeError as exc:
        raise ConfigError(f"dataset {name!r} could not be read from {root}: {exc}") from exc


def load_torchvision(name: str, data_dir: Path, download: bool) -> Splits:
    """MNIST, Fashion-MNIST or CIFAR-10 with their official train/test split."""
    parts: list[torch.Tensor] = []
    for train in (True, False):
        dataset = _torchvision_set(name, data_dir, train, download)
        data = torch.as_tensor(dataset.data)  # type: ignore[attr-defined]
        if data.ndim == 3:  # (N, H, W) grey -> (N, 1, H, W)
            data = data.unsqueeze(1)
        else:  # CIFAR keeps (N, H, W, C)
            data = data.permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)  # type: ignore[attr-defined]
        parts += [data, labels]
    stats = {
        "mnist": ((0.1307,), (0.3081,)),
        "fashion-mnist": ((0.2860,), (0.3530,)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    }[name]
    train_x, train_y, test_x, test_y = parts
    return Splits(
        train_x, train_y, test_x, test_y, num_classes=10, scale=1 / 255, mean=stats[0], std=stats[1]
    )


def load_dataset(
    name: str, data_dir: Path, download: bool = False, seed: int = 0, test_fraction: float = 0.2
) -> Splits:
    if name == "digits":
        return load_digits(seed, test_fraction)
    if name in BUILTIN:
        return load_torchvision(name, data_dir, download)
    if is_import_path(name):
        splits = load_callable(name)(
            data_dir=data_dir, download=download, seed=seed, test_fraction=test_fraction
        )
        if not isinstance(splits, Splits):
            raise ConfigError(f"{name!r} returned {type(splits).__name__}, not Splits")
        return splits
    raise ConfigError(f"unknown dataset {name!r}: use one of {BUILTIN} or module:function")
