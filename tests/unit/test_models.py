"""Models by name: the small CNN, torchvision models and a user's factory by import path."""

from __future__ import annotations

import pytest
import torch
from fedstream.common.errors import ConfigError
from fedstream.common.models import SmallCNN, build_model
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.input_shape = input_shape
        features = 1
        for dim in input_shape:
            features *= dim
        self.linear = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]


def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user model factory, loaded by ``build_model`` through its import path."""
    return TinyNet(input_shape, num_classes)


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "oops"


@pytest.mark.parametrize(
    ("input_shape", "num_classes"), [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 7)]
)
def test_small_cnn_maps_images_to_class_scores(
    input_shape: tuple[int, int, int], num_classes: int
) -> None:
    model = SmallCNN(in_channels=input_shape[0], num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.zeros(5, *input_shape))
    assert out.shape == (5, num_classes)


def test_small_cnn_carries_integer_batchnorm_counters() -> None:
    state = SmallCNN().state_dict()
    counters = [name for name in state if name.endswith("num_batches_tracked")]
    assert counters
    assert all(state[name].dtype == torch.int64 for name in counters)


def test_build_model_cnn_follows_the_input_channels() -> None:
    model = build_model("cnn", (3, 16, 16), num_classes=4)
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 4)


def test_build_model_is_deterministic_for_a_seed() -> None:
    first = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    again = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    assert list(first) == list(again)
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name


def test_build_model_differs_across_seeds() -> None:
    one = build_model("cnn", (1, 8, 8), 10, seed=1).state_dict()
    two = build_model("cnn", (1, 8, 8), 10, seed=2).state_dict()
    assert not torch.equal(one["head.4.weight"], two["head.4.weight"])


def test_build_model_by_import_path_passes_shape_and_classes() -> None:
    model = build_model("tests.unit.test_models:factory", (1, 8, 8), num_classes=6)
    assert isinstance(model, TinyNet)
    assert model.input_shape == (1, 8, 8)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 6)


def test_import_path_returning_something_else_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not torch.nn.Module"):
        build_model("tests.unit.test_models:not_a_model", (1, 8, 8), 10)


@pytest.mark.parametrize(
    "name",
    [
        "no_such_model",
        "tests.unit.test_models:absent",
        "no_such_package_xyz.models:factory",
        ":factory",
        "tests.unit.test_models:",
    ],
)
def test_unknown_model_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        build_model(name, (1, 8, 8), 10)


def test_torchvision_model_by_name_builds_for_rgb_images() -> None:
    model = build_model("resnet18", (3, 32, 32), num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_torchvision_model_refuses_grey_images() -> None:
    with pytest.raises(ConfigError, match="3-channel"):
        build_model("resnet18", (1, 28, 28), num_classes=10)
