"""Layers the ONNX exporter cannot take at the traced input size, found when the space is built, not after a search.

The exporter takes an adaptive pooling only where each input size is a multiple of its output size (it becomes a
fixed pooling). An adaptive average pooling from any other size is a fixed linear map of its input, which export
rewrites exactly (policies/export.py); an adaptive max pooling has no such form, so the space refuses the model
with the layer's name and the way out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from squeezer.spaces.graph import SpaceError

__all__ = ["AdaptivePool", "ADAPTIVE_AVG", "ADAPTIVE_MAX", "uneven_adaptive_pools", "check_exportable"]

ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_DIMS = {kind: i + 1 for kinds in (ADAPTIVE_AVG, ADAPTIVE_MAX) for i, kind in enumerate(kinds)}  # pooled dims


@dataclass(frozen=True)
class AdaptivePool:
    """An adaptive pooling whose input sizes are not multiples of its output sizes, as one forward pass saw it."""

    name: str
    in_size: tuple[int, ...]  # the pooled (spatial) dimensions of its input
    out_size: tuple[int, ...]


def uneven_adaptive_pools(model: nn.Module, example_inputs: torch.Tensor) -> list[AdaptivePool]:
    """The adaptive poolings of `model` that see, on `example_inputs`, a size that is not a multiple of their
    output's (the ones the exporter refuses)."""
    found: dict[str, AdaptivePool] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: object) -> None:
            if not isinstance(output, torch.Tensor):  # return_indices: (values, indices)
                output = output[0]  # type: ignore[index]
            dims = _DIMS[type(module)]
            size_in, size_out = tuple(inputs[0].shape[-dims:]), tuple(output.shape[-dims:])
            if any(i % o for i, o in zip(size_in, size_out)):
                found.setdefault(name, AdaptivePool(name, size_in, size_out))
        return fn

    for name, module in model.named_modules():
        if type(module) in _DIMS:
            handles.append(module.register_forward_hook(hook(name)))
    if not handles:
        return []
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    return list(found.values())


def check_exportable(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Raise SpaceError naming the first layer the ONNX exporter would refuse and that export cannot rewrite."""
    for pool in uneven_adaptive_pools(model, example_inputs):
        if isinstance(model.get_submodule(pool.name), ADAPTIVE_MAX):
            size = "x".join(map(str, pool.in_size))
            raise SpaceError(
                f"layer {pool.name!r} ({type(model.get_submodule(pool.name)).__name__} to {pool.out_size}) gets "
                f"{size} inputs, not a multiple of its output size, which ONNX cannot export: use inputs that make "
                f"it a multiple (e.g. a larger image size) or an adaptive average pooling")
