"""A model's final classifier layer, found by shape alone, and how a fresh one sized for other classes replaces it.

Found generically, with no per-model names: the last Linear, or 1x1 convolution (SqueezeNet's), in registration
order whose output count is the model's. `squeezer train --replace-head` uses it to fine-tune a pretrained model on
data with other classes; a checkpoint file uses it to read how many classes its weights were trained for.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from squeezer.model_error import ModelError

__all__ = ["find_head", "head_classes", "replace_head", "replaced_head"]


def _outputs_of(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
        return module.out_channels
    return None


def find_head(model: nn.Module, outputs: int) -> str | None:
    """The name of the model's final classifier: its last Linear or 1x1 conv with `outputs` outputs, or None."""
    found = None
    for name, module in model.named_modules():
        if name and _outputs_of(module) == outputs:
            found = name
    return found


def head_classes(state: Mapping[str, torch.Tensor], head: str) -> int | None:
    """How many outputs a state_dict's weights give the layer named `head` (None when it holds no such layer)."""
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None


def replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Put a fresh layer with `num_classes` outputs in place of the one named `head` (same kind, inputs, bias,
    dtype and device); everything before it keeps its weights."""
    old = model.get_submodule(head)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, 1, stride=old.stride, bias=old.bias is not None)
    else:
        raise ModelError(f"layer {head!r} is a {type(old).__name__}, not a Linear or 1x1 conv: cannot replace it")
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replaced_head(model: nn.Module, example: torch.Tensor, num_classes: int) -> str:
    """Replace the model's final classifier with a fresh one of `num_classes` outputs; returns the layer's name."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = int(model(example).shape[-1])
        head = find_head(model, outputs)
        if head is None:
            raise ModelError(f"found no final classifier in the model (a Linear or 1x1 conv with its {outputs} "
                             "outputs): give it one, or build it with the data's number of classes")
        replace_head(model, head, num_classes)
        with torch.no_grad():
            now = int(model(example).shape[-1])
    finally:
        model.train(was)
    if now != num_classes:
        raise ModelError(f"replacing layer {head!r} left the model with {now} outputs, not {num_classes}: its last "
                         "layer is not its classifier; build it with the data's number of classes instead")
    return head
