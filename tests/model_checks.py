"""Small measurements the applier tests share (imported by the test modules, not a test module itself)."""
from __future__ import annotations

import torch
from torch import nn


def layer_params(model: nn.Module) -> int:
    """Weights and biases of every Conv2d and Linear: what the space's cost prediction counts."""
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def rows_match(model: nn.Module, space, policy) -> bool:
    """Each unit's layers have the output channels the space predicts for its form (the quantizers the size
    counts), in order."""
    channels = space.unit_channels(policy.layers)
    return all(
        [m.weight.shape[0] for m in model.get_submodule(unit).modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        == list(space.layer_rows(space.units[unit], *channels[unit], choice)) for unit, choice in policy.layers.items())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
