"""Graph analysis: which layers can be compressed and which of their channels are tied together.

Torch-Pruning's dependency graph follows residual adds, concats and depthwise convolutions, so pruning one
group removes the same channels everywhere they are coupled and never leaves a broken graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn


class SpaceError(ValueError):
    """A model that cannot be analysed; the message names the cause and the fix."""


@dataclass(frozen=True)
class LayerInfo:
    """One compressible module as seen in one forward pass (shapes are per sample)."""

    name: str
    kind: str  # "conv", "dwconv", "gconv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    positions: int  # output positions per sample (H*W for convs, tokens for linears)
    has_bias: bool
    is_output: bool  # produces the model's output: never pruned


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together; named after the first layer (in forward order) that produces them."""

    name: str
    channels: int
    producers: tuple[str, ...]  # layers whose output channels are these
    consumers: tuple[str, ...]  # layers whose input channels are these
    prunable: bool
    note: str = ""


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels == module.out_channels:
        return "dwconv"
    return "gconv"


def trace_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[LayerInfo]:
    """Run one forward pass with hooks to record each Conv2d/Linear's shapes in execution order."""
    records: dict[str, LayerInfo] = {}
    order: list[str] = []
    hooks = []
    last_output: list[Any] = [None]

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in records:  # a module called twice (weight sharing) keeps its first record
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                info = LayerInfo(name, _kind(module), module.in_channels, module.out_channels,
                                 tuple(module.kernel_size), tuple(module.stride), module.groups,
                                 tuple(x.shape[-2:]), tuple(output.shape[-2:]),
                                 int(output.shape[-1] * output.shape[-2]), module.bias is not None, False)
            else:
                positions = int(output[0].numel() // module.out_features) if output.dim() > 1 else 1
                info = LayerInfo(name, "linear", module.in_features, module.out_features, (1, 1), (1, 1), 1,
                                 (1, 1), (1, 1), positions, module.bias is not None, False)
            records[name] = info
            order.append(name)
            last_output[0] = output
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    except Exception as exc:
        raise SpaceError(f"the model fails on inputs of shape {tuple(example_inputs.shape)} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}): pass inputs the model accepts") from None
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise SpaceError("the model has no Conv2d or Linear layers: nothing to compress")
    layers = [records[n] for n in order]
    # The layer whose output is the model's output (the classifier) is never pruned.
    if isinstance(out, torch.Tensor) and last_output[0] is not None and last_output[0].shape == out.shape:
        last = layers[-1]
        layers[-1] = LayerInfo(**{**last.__dict__, "is_output": True})
    return layers


def channel_groups(model: nn.Module, example_inputs: torch.Tensor, layers: list[LayerInfo]) -> list[ChannelGroup]:
    """Coupled output-channel groups of the traced layers, through Torch-Pruning's dependency graph."""
    names = {module: name for name, module in model.named_modules()}
    order = {info.name: i for i, info in enumerate(layers)}
    by_name = {info.name: info for info in layers}
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # e.g. a channel shuffle: no layer can be pruned safely, the other knobs remain
        note = f"channel dependencies could not be traced ({type(exc).__name__}); pruning disabled"
        warnings.warn(f"{note}: the space offers the other knobs only", stacklevel=3)
        return [ChannelGroup(i.name, i.out_channels, (i.name,), (), False, note) for i in layers if not i.is_output]

    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    for info in layers:
        if info.name in seen or info.is_output:
            continue
        module = model.get_submodule(info.name)
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        try:
            group = graph.get_pruning_group(module, fn, idxs=list(range(info.out_channels)))
            producers, consumers = set(), set()
            for dep, _ in group:
                target = names.get(dep.target.module)
                if target not in by_name:
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    producers.add(target)
                elif graph.is_in_channel_pruning_fn(dep.handler):
                    consumers.add(target)
            prunable, note = True, ""
            if any(by_name[p].is_output for p in producers):
                prunable, note = False, "feeds the model output"
            elif any(by_name[p].kind == "gconv" for p in producers | consumers):
                prunable, note = False, "grouped convolution (not depthwise) ties channels in blocks"
        except Exception as exc:  # e.g. channel shuffle: refuse this group, keep the other knobs
            producers, consumers = {info.name}, set()
            prunable, note = False, f"dependency graph failed ({type(exc).__name__})"
        producers.add(info.name)
        # A depthwise conv's output channels are its input channels: it both consumes and produces the group.
        consumers -= {p for p in producers if by_name[p].kind != "dwconv"}
        ordered = tuple(sorted(producers, key=order.__getitem__))
        seen.update(ordered)
        groups.append(ChannelGroup(ordered[0], info.out_channels, ordered,
                                   tuple(sorted(consumers, key=order.__getitem__)), prunable, note))
    return groups
