"""Datasets: the bundled digits, user datasets by import path, and torchvision's loaders
reading real IDX files from a data folder (no network).
"""

from __future__ import annotations

import collections
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from fedstream.common.data import Splits, load_dataset
from fedstream.common.errors import ConfigError

# From the repository root, the shared test data is ../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
DIGITS_COUNT = 1797  # scikit-learn's bundled handwritten digits

needs_mnist = pytest.mark.skipif(
    not (MNIST_RAW / "t10k-images-idx3-ubyte").is_file(),
    reason=f"the real MNIST test split is not at {MNIST_RAW} (../shared/data)",
)


def rows(x: torch.Tensor, y: torch.Tensor) -> collections.Counter[bytes]:
    """Each example as bytes (image then label), counted, so splits compare as multisets."""
    return collections.Counter(
        x[i].numpy().tobytes() + int(y[i]).to_bytes(2, "little") for i in range(len(y))
    )


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits", Path("unused"), seed=0, test_fraction=0.2)


# ---- digits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test_fraction", "n_test"),
    [(0.2, 359), (0.1, 180), (0.25, 449)],  # 1797 * f = 359.4, 179.7, 449.25, rounded
)
def test_digits_split_sizes_follow_test_fraction(test_fraction: float, n_test: int) -> None:
    splits = load_dataset("digits", Path("unused"), seed=0, test_fraction=test_fraction)
    assert len(splits.test_y) == len(splits.test_x) == n_test
    assert len(splits.train_y) == len(splits.train_x) == DIGITS_COUNT - n_test


def test_digits_shapes_and_dtypes(digits: Splits) -> None:
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.train_y.dtype == torch.int64
    assert set(digits.train_y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_for_a_seed(digits: Splits) -> None:
    again = load_dataset("digits", Path("unused"), seed=0, test_fraction=0.2)
    assert torch.equal(again.train_x, digits.train_x)
    assert torch.equal(again.test_y, digits.test_y)


def test_digits_split_differs_across_seeds(digits: Splits) -> None:
    other = load_dataset("digits", Path("unused"), seed=1, test_fraction=0.2)
    assert not torch.equal(other.test_x, digits.test_x)


def test_digits_train_and_test_partition_the_dataset(digits: Splits) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = rows(
        torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1),
        torch.tensor(bunch.target),
    )
    train = rows(digits.train_x, digits.train_y)
    test = rows(digits.test_x, digits.test_y)
    assert train + test == full  # no example lost, none in both beyond its multiplicity


def test_prepare_gives_normalised_float32(digits: Splits) -> None:
    batch = digits.train_x[:16]
    prepared = digits.prepare(batch)
    assert prepared.dtype == torch.float32
    assert prepared.shape == batch.shape
    # digits store 0..16: (x / 16 - 0.3) / 0.4
    torch.testing.assert_close(prepared, (batch / 16 - 0.3) / 0.4)


def test_prepare_normalises_each_channel_with_its_own_statistics() -> None:
    batch = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    splits = Splits(
        batch, labels, batch, labels, 10, scale=1 / 255, mean=(0.5, 0.0, 1.0), std=(0.5, 2.0, 1.0)
    )
    prepared = splits.prepare(batch)
    assert prepared.dtype == torch.float32
    # channel values: (1 - 0.5) / 0.5 = 1;  (1 - 0) / 2 = 0.5;  (1 - 1) / 1 = 0
    assert prepared[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]


# ---- datasets by name or import path ----------------------------------------------------


def tiny_dataset(data_dir: Path, download: bool, seed: int, test_fraction: float) -> Splits:
    """A user dataset factory, loaded by ``load_dataset`` through its import path."""
    x = torch.arange(4 * 12, dtype=torch.float32).view(12, 1, 2, 2)
    y = torch.arange(12) % 3
    n_test = int(12 * test_fraction)
    return Splits(x[n_test:], y[n_test:], x[:n_test], y[:n_test], num_classes=3)


def not_a_dataset(**kwargs: object) -> str:
    return "oops"


def test_dataset_by_import_path_gets_the_run_arguments() -> None:
    splits = load_dataset(
        "tests.unit.test_data:tiny_dataset", Path("unused"), seed=0, test_fraction=0.25
    )
    assert splits.num_classes == 3
    assert len(splits.test_y) == 3 and len(splits.train_y) == 9


def test_dataset_factory_returning_something_else_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Splits"):
        load_dataset("tests.unit.test_data:not_a_dataset", Path("unused"))


@pytest.mark.parametrize(
    "name", ["imagenet", "tests.unit.test_data:absent", "no_such_package_xyz.data:load"]
)
def test_unknown_dataset_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        load_dataset(name, Path("unused"))


# ---- torchvision loaders on IDX files ---------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header, then uint8 data) independently of torchvision."""
    raw = path.read_bytes()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and dtype_code == 0x08  # unsigned bytes
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file: magic 0x0000_08_<ndim>, sizes, then bytes."""
    assert array.dtype == np.uint8
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST/raw with the real t10k files and a training split cut from their first 2,000."""
    if not (MNIST_RAW / "t10k-images-idx3-ubyte").is_file():
        pytest.skip(f"the real MNIST test split is not at {MNIST_RAW} (../shared/data)")
    root = tmp_path_factory.mktemp("mnist-data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copyfile(MNIST_RAW / name, raw / name)
    images = read_idx(MNIST_RAW / "t10k-images-idx3-ubyte")
    labels = read_idx(MNIST_RAW / "t10k-labels-idx1-ubyte")
    write_idx(raw / "train-images-idx3-ubyte", images[:2000])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:2000])
    return root


@needs_mnist
def test_mnist_loads_28x28_uint8_images_with_the_official_test_split(mnist_dir: Path) -> None:
    splits = load_dataset("mnist", mnist_dir)
    assert splits.test_x.shape == (10_000, 1, 28, 28)
    assert splits.train_x.shape == (2_000, 1, 28, 28)
    assert splits.test_x.dtype == torch.uint8
    assert splits.test_y.dtype == torch.int64 and splits.test_y.shape == (10_000,)
    assert splits.num_classes == 10


@needs_mnist
def test_mnist_images_and_labels_match_the_idx_files(mnist_dir: Path) -> None:
    splits = load_dataset("mnist", mnist_dir)
    images = read_idx(MNIST_RAW / "t10k-images-idx3-ubyte")
    labels = read_idx(MNIST_RAW / "t10k-labels-idx1-ubyte")
    assert np.array_equal(splits.test_x[:, 0].numpy(), images)
    assert np.array_equal(splits.test_y.numpy(), labels.astype(np.int64))
    assert np.array_equal(splits.train_y.numpy(), labels[:2000].astype(np.int64))
    assert np.bincount(splits.test_y.numpy(), minlength=10).min() > 800  # every digit present


@needs_mnist
def test_mnist_prepare_normalises_to_zero_mean_unit_std(mnist_dir: Path) -> None:
    splits = load_dataset("mnist", mnist_dir)
    prepared = splits.prepare(splits.test_x)
    assert prepared.dtype == torch.float32
    assert abs(float(prepared.mean())) < 0.05
    assert abs(float(prepared.std()) - 1.0) < 0.05


def test_fashion_mnist_loads_from_idx_files(tmp_path: Path) -> None:
    # Fashion-MNIST shares MNIST's file names and format, in FashionMNIST/raw.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 300, dtype=np.uint8)
    test_images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 120, dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train_images)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)

    splits = load_dataset("fashion-mnist", tmp_path)
    assert splits.train_x.shape == (300, 1, 28, 28) and splits.train_x.dtype == torch.uint8
    assert splits.test_x.shape == (120, 1, 28, 28)
    assert np.array_equal(splits.train_x[:, 0].numpy(), train_images)
    assert np.array_equal(splits.test_y.numpy(), test_labels.astype(np.int64))
    assert splits.mean != (0.1307,)  # its own statistics, not MNIST's


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion-mnist"])
def test_missing_dataset_without_download_hints_at_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="--download"):
        load_dataset(name, tmp_path, download=False)


def test_mnist_with_only_the_test_split_names_the_files_it_lacks(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"")
    with pytest.raises(ConfigError) as refused:
        load_dataset("mnist", tmp_path, download=False)
    message = str(refused.value)
    assert "MNIST/raw/train-images-idx3-ubyte" in message
    assert "MNIST/raw/train-labels-idx1-ubyte" in message and "t10k" not in message
    assert str(tmp_path.resolve()) in message
