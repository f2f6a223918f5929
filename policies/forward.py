"""Running calibration batches through a model with forward hooks attached: the one loop appliers share."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, Any], None]


def run_hooked(model: nn.Module, hooks: Iterable[tuple[nn.Module, Hook]], batches: Iterable[torch.Tensor]) -> None:
    """Run each batch through `model` (eval mode, no grad) with the forward hooks attached; they are always removed,
    so a failing batch never leaves a hook behind on a model the caller keeps."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            for batch in batches:
                model.eval()(batch)
    finally:
        for handle in handles:
            handle.remove()
