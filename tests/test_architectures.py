"""torchvision's models as a new user meets them: space, random policies, apply, MACs and ONNX (architecture_checks)."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision

from architecture_checks import check_model, torchvision_builder

FAST = ("squeezenet1_1", "mobilenet_v3_small")


@pytest.mark.parametrize("name", FAST)
def test_small_models_keep_outputs_and_are_priced_exactly(name: str, one_thread) -> None:
    row = check_model(name, torchvision_builder(name, 64), torch.randn(1, 3, 64, 64))
    assert row.ok, row.problems


# Concat networks and a plain residual one, whose pricing the sweep repaired; the whole list (vision transformers
# included: tiny ones run in tests/test_transformers.py) runs with SQUEEZER_SWEEP=all or
# benchmarks/architecture_sweep.py.
SLOW = ("googlenet", "mobilenet_v3_large", "resnet18")
ALL = sorted(set(torchvision.models.list_models(module=torchvision.models))
             | set(torchvision.models.list_models(module=torchvision.models.segmentation)) - set(FAST))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL if os.environ.get("SQUEEZER_SWEEP") == "all" else SLOW)
def test_every_torchvision_model(name: str, one_thread) -> None:
    row = check_model(name, torchvision_builder(name, 64), torch.randn(1, 3, 64, 64))
    assert row.ok, row.problems
