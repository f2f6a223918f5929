"""Shared fixtures: small real models on real (bundled) data, built once per session."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest
import torch

from squeezer.evaluators.data import DataBundle

from squeezer.datasets import load_data
from squeezer.models import mobilenetv2_small, resnet20

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def squeezer_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's own cache (the empty study database new SQLite studies copy), not the user's."""
    previous = os.environ.get("SQUEEZER_CACHE")
    os.environ["SQUEEZER_CACHE"] = str(tmp_path_factory.mktemp("squeezer-cache"))
    yield
    if previous is None:
        os.environ.pop("SQUEEZER_CACHE", None)
    else:
        os.environ["SQUEEZER_CACHE"] = previous


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_data("digits")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One torch thread for tests of many small ops: with two threads on a 2-core machine that another process keeps
    busy, every op waits for the descheduled thread."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def trained_resnet(digits: DataBundle) -> torch.nn.Module:
    """ResNet-20 briefly trained on digits (98% val), for checks that need real activations and predictions.

    Session-scoped and shared: tests must not change it (apply_policy copies the model it is given)."""
    from squeezer.evaluators.finetune import FitConfig, fit

    torch.manual_seed(0)
    with torch_threads(1):  # two threads on a busy 2-core machine wait on each other
        return fit(resnet20(num_classes=10, in_channels=1), digits.train, FitConfig(steps=80)).eval()


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
