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
    # Layer -> how many of its output (producers) or input (consumers) indices the group's channels are: a flatten
    # makes one channel many inputs, and a concatenation's consumer takes only part of its inputs from the group.
    out_width: tuple[tuple[str, int], ...] = ()
    in_width: tuple[tuple[str, int], ...] = ()


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels == module.out_channels:
        return "dwconv"
    return "gconv"


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


# Autograd nodes of ops that mix channels with weights: an output reached only through one of these is not the
# output of a layer further up (a matmul of attention, or a functional linear outside any module).
_MIXING_NODES = ("ConvolutionBackward", "AddmmBackward", "MmBackward", "BmmBackward", "LinearBackward")


def _output_layers(outputs: list[torch.Tensor], produced: dict[Any, str]) -> set[str]:
    """Layers whose output channels reach a model output without passing another channel-mixing op: walks the
    autograd graph back from each output and stops at the first layer (or mixing op) on every path."""
    found: set[str] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.add(produced[node])
            continue
        if type(node).__name__.startswith(_MIXING_NODES):
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def trace_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[LayerInfo]:
    """Run one forward pass with hooks to record each Conv2d/Linear's shapes in execution order; the layers whose
    channels reach a model output (classifiers, heads, every output of several) are marked `is_output`."""
    records: dict[str, LayerInfo] = {}
    order: list[str] = []
    hooks = []
    produced: dict[Any, str] = {}  # autograd node of a layer's output -> the layer

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                produced.setdefault(output.grad_fn, name)
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
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.enable_grad():  # the autograd graph is how outputs are traced back to their layers
            out = model.eval()(example_inputs)
    except Exception as exc:
        raise SpaceError(f"the model fails on inputs of shape {tuple(example_inputs.shape)} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}): pass inputs the model accepts") from None
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise SpaceError("the model has no Conv2d or Linear layers: nothing to compress")
    outputs = _output_layers(_tensors(out), produced)
    return [LayerInfo(**{**records[n].__dict__, "is_output": True}) if n in outputs else records[n] for n in order]


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
            out_idx: dict[str, set[int]] = {}
            in_idx: dict[str, set[int]] = {}
            for dep, idxs in group:
                target = names.get(dep.target.module)
                if target not in by_name:
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    producers.add(target)
                    out_idx.setdefault(target, set()).update(int(i) for i in idxs)
                elif graph.is_in_channel_pruning_fn(dep.handler):
                    consumers.add(target)
                    in_idx.setdefault(target, set()).update(int(i) for i in idxs)
            prunable, note = True, ""
            if any(by_name[p].is_output for p in producers):
                prunable, note = False, "feeds the model output"
            elif any(by_name[p].kind == "gconv" for p in producers | consumers):
                prunable, note = False, "grouped convolution (not depthwise) ties channels in blocks"
        except Exception as exc:  # e.g. channel shuffle: refuse this group, keep the other knobs
            producers, consumers, out_idx, in_idx = {info.name}, set(), {}, {}
            prunable, note = False, f"dependency graph failed ({type(exc).__name__})"
        producers.add(info.name)
        out_idx.setdefault(info.name, set(range(info.out_channels)))
        # A depthwise conv's output channels are its input channels: the space prices its input from its output.
        consumers -= {p for p in producers if by_name[p].kind == "dwconv"}
        ordered = tuple(sorted(producers, key=order.__getitem__))
        seen.update(ordered)
        inputs = tuple(sorted(consumers, key=order.__getitem__))
        groups.append(ChannelGroup(ordered[0], info.out_channels, ordered, inputs, prunable, note,
                                   tuple((p, len(out_idx.get(p, ())) or info.out_channels) for p in ordered),
                                   tuple((c, len(in_idx.get(c, ()))) for c in inputs)))
    return groups
