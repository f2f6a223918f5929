"""Shared fixtures: small real models on real (bundled) data, built once per session."""
from __future__ import annotations

import pytest
import torch

from squeezer.evaluators.data import DataBundle, load_data
from squeezer.evaluators.zoo import mobilenetv2_small, resnet20

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_data("digits")


@pytest.fixture()
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet20(num_classes=10, in_channels=1).eval()


@pytest.fixture()
def mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return mobilenetv2_small(num_classes=10, in_channels=1).eval()


@pytest.fixture()
def resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()
