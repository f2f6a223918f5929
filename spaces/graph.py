"""Graph analysis: which layers can be compressed and which of their channels are tied together.

Torch-Pruning's dependency graph follows residual adds, concats and depthwise convolutions, so pruning one
group removes the same channels everywhere they are coupled and never leaves a broken graph.
"""
from __future__ import annotations

import logging
import warnings
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from squeezer.spaces.dependency import (AnalysisTooLarge, build_graph, layer_cuts, out_channel_fn, pruning_group,
                                        replay_cuts)

log = logging.getLogger(__name__)


class SpaceError(ValueError):
    """A model that cannot be analysed; the message names the cause and the fix."""


@dataclass(frozen=True)
class LayerInfo:
    """One compressible module as seen in one forward pass (shapes are per sample).

    A 1-d convolution is a 1 x k one; a 3-d convolution folds depth into the first dimension of its kernel, stride
    and sizes (what its cost needs), and `spatial_dims` says which it was. An embedding's in_channels are its rows;
    a recurrent layer's are its input features and its out_channels its hidden size.
    """

    name: str
    kind: str  # "conv", "dwconv", "gconv", "linear", "tconv" (transposed), "embedding" or "recurrent"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    positions: int  # output positions per sample (H*W for convs, tokens for linears, embeddings and recurrences)
    has_bias: bool
    is_output: bool  # produces the model's output: never pruned
    spatial_dims: int = 2  # a convolution's: 1, 2 or 3
    recurrent: tuple[int, int, int] = ()  # a recurrent layer's (gates, stacked layers, directions)


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


# What computes with weights, by module: each is a unit, priced from the shapes one forward pass shows.
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}  # gates per step
UNIT_MODULES = (*_CONVS, *_TCONVS, nn.Linear, nn.Embedding, *_RECURRENT)
# Kinds that never lead a channel group (an embedding's width is pruned with the layers that read it, if at all;
# a recurrent layer's hidden size is not pruned).
_FOLLOWERS = ("embedding", "recurrent")
CONV_KINDS = ("conv", "dwconv", "gconv", "tconv")


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _TCONVS):
        return "tconv"
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


def _fold(sizes: tuple[int, ...]) -> tuple[int, int]:
    """A convolution's sizes as two: a 1-d one as 1 x n, a 3-d one with depth folded into the first."""
    sizes = tuple(int(s) for s in sizes)
    return (1, sizes[0]) if len(sizes) == 1 else (int(torch.tensor(sizes[:-1]).prod()), sizes[-1])


def _record(name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> LayerInfo:
    """The LayerInfo of a unit module called on `x` with `output` (the first tensor of a recurrent layer's)."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, (*_CONVS, *_TCONVS)):
        dims = len(module.kernel_size)
        in_hw, out_hw = _fold(tuple(x.shape[-dims:])), _fold(tuple(output.shape[-dims:]))
        return LayerInfo(name, _kind(module), module.in_channels, module.out_channels, _fold(module.kernel_size),
                         _fold(module.stride), module.groups, in_hw, out_hw, out_hw[0] * out_hw[1], bias, False,
                         spatial_dims=dims)
    if isinstance(module, nn.Linear):
        positions = int(output[0].numel() // module.out_features) if output.dim() > 1 else 1
        return LayerInfo(name, "linear", module.in_features, module.out_features, (1, 1), (1, 1), 1,
                         (1, 1), (1, 1), positions, bias, False)
    if isinstance(module, nn.Embedding):
        positions = int(output.numel() // module.embedding_dim)
        return LayerInfo(name, "embedding", module.num_embeddings, module.embedding_dim, (1, 1), (1, 1), 1,
                         (1, 1), (1, 1), positions, False, False)
    directions = 2 if module.bidirectional else 1
    positions = int(output.numel() // (module.hidden_size * directions))
    return LayerInfo(name, "recurrent", module.input_size, module.hidden_size, (1, 1), (1, 1), 1, (1, 1), (1, 1),
                     positions, bool(module.bias), False,
                     recurrent=(_RECURRENT[type(module)], module.num_layers, directions))


def trace_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[LayerInfo]:
    """Run one forward pass with hooks to record each unit's shapes in execution order; the layers whose
    channels reach a model output (classifiers, heads, every output of several) are marked `is_output`."""
    records: dict[str, LayerInfo] = {}
    order: list[str] = []
    hooks = []
    produced: dict[Any, str] = {}  # autograd node of a layer's output -> the layer

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            output = output[0] if isinstance(output, tuple) else output  # a recurrent layer's (output, state)
            if not isinstance(output, torch.Tensor):
                return
            if output.grad_fn is not None:
                produced.setdefault(output.grad_fn, name)
            if name in records:  # a module called twice (weight sharing) keeps its first record
                return
            records[name] = _record(name, module, inputs[0], output)
            order.append(name)
        return fn

    for name, module in model.named_modules():
        if isinstance(module, UNIT_MODULES) and not (isinstance(module, nn.RNNBase) and module.proj_size):
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
        raise SpaceError("the model has no convolution, Linear, Embedding or recurrent layers: nothing to compress")
    outputs = _output_layers(_tensors(out), produced)
    return [LayerInfo(**{**records[n].__dict__, "is_output": True}) if n in outputs else records[n] for n in order]


def channel_groups(model: nn.Module, example_inputs: torch.Tensor, layers: list[LayerInfo],
                   smallest: Callable[[int], int] | None = None,
                   refine: Callable[[list[ChannelGroup]], list[ChannelGroup]] | None = None) -> list[ChannelGroup]:
    """Coupled output-channel groups of the traced layers, through Torch-Pruning's dependency graph.

    `refine` (e.g. the attention's rule) may make groups unprunable before the check; `smallest`: channels -> the
    fewest a group may keep; each prunable group cut to it must leave a model that still runs on `example_inputs`
    (checked on a copy), else it is not prunable."""
    names = {module: name for name, module in model.named_modules()}
    order = {info.name: i for i, info in enumerate(layers)}
    by_name = {info.name: info for info in layers}
    cuts: dict[str, Any] = {}  # group -> its layers' cuts, for the smallest-option check
    try:
        graph = build_graph(model, example_inputs)
    except Exception as exc:  # e.g. a channel shuffle: no layer can be pruned safely, the other knobs remain
        note = f"channel dependencies could not be traced ({type(exc).__name__}); pruning disabled"
        warnings.warn(f"{note}: the space offers the other knobs only", stacklevel=3)
        return [ChannelGroup(i.name, i.out_channels, (i.name,), (), False, note) for i in layers if not i.is_output]

    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    for info in layers:
        if info.name in seen or info.is_output or info.kind in _FOLLOWERS:
            continue
        module = model.get_submodule(info.name)
        try:
            group = pruning_group(graph, module, range(info.out_channels))
            cuts[info.name] = layer_cuts(group, names)
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
        except Exception as exc:  # e.g. channel shuffle or an index explosion: refuse this group, keep the other knobs
            producers, consumers, out_idx, in_idx = {info.name}, set(), {}, {}
            what = "grew too large" if isinstance(exc, AnalysisTooLarge) else f"failed ({type(exc).__name__})"
            prunable, note = False, f"dependency analysis {what}"
            log.warning("channel group %s is not prunable: %s", info.name, note)
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
    groups = groups if refine is None else refine(groups)
    return groups if smallest is None else _runnable(model, example_inputs, groups, cuts, smallest)


def _runnable(model: nn.Module, example_inputs: torch.Tensor, groups: list[ChannelGroup], cuts: dict[str, Any],
              smallest: Callable[[int], int]) -> list[ChannelGroup]:
    """The groups, with each one whose smallest option breaks a forward pass (or changes an output's shape) on a
    copy made unprunable. All are cut at once first (one forward); only if that fails is each tried alone."""
    cut = [g for g in groups if g.prunable and smallest(g.channels) < g.channels]
    plans = {g.name: (cuts[g.name], range(g.channels - smallest(g.channels))) for g in cut if cuts.get(g.name)}
    loose = {g.name: g.channels - smallest(g.channels) for g in cut if cuts.get(g.name) is None}
    if not plans and not loose:
        return groups
    with torch.no_grad():
        want = [t.shape for t in _tensors(model.eval()(example_inputs))]
    # Groups that cannot be replayed (an item on a bare parameter) are cut as the applier cuts them: in turn, on a
    # graph of the copy; if that breaks, all of them are refused (one graph, not one per group).
    broken: dict[str, Any] = dict.fromkeys(loose) if loose and _graph_cut_breaks(model, example_inputs, loose, want) \
        else {}
    if plans and _breaks(model, example_inputs, list(plans.values()), want):
        alone = {name: plan for name, plan in plans.items() if _breaks(model, example_inputs, [plan], want)}
        rest = [plan for name, plan in plans.items() if name not in alone]
        broken.update(plans if rest and _breaks(model, example_inputs, rest, want) else alone)  # together: none safe
    for name in broken:
        log.warning("channel group %s is not prunable: its smallest option breaks the forward pass", name)
    note = "its smallest option breaks the forward pass"
    return [replace(g, prunable=False, note=note) if g.name in broken else g for g in groups]


def _graph_cut_breaks(model: nn.Module, example_inputs: torch.Tensor, loose: dict[str, int], want: list) -> bool:
    """Whether a copy of `model` with each of `loose` (group -> channels to remove) pruned in turn on its own
    dependency graph fails on `example_inputs` or changes an output's shape."""
    copy = deepcopy(model)
    try:
        graph = build_graph(copy, example_inputs)
        for name, n in loose.items():
            leader = copy.get_submodule(name)
            graph.get_pruning_group(leader, out_channel_fn(leader), idxs=list(range(n))).prune()
        with torch.no_grad():
            return [t.shape for t in _tensors(copy(example_inputs))] != want
    except Exception:  # noqa: BLE001  (any failure of the cut or the forward is what is being checked)
        return True


def _breaks(model: nn.Module, example_inputs: torch.Tensor, plans: list, want: list) -> bool:
    """Whether a copy of `model` with `plans` cut fails on `example_inputs` or changes an output's shape."""
    copy = deepcopy(model)
    try:
        replay_cuts(copy, plans)
        with torch.no_grad():
            return [t.shape for t in _tensors(copy(example_inputs))] != want
    except Exception:  # noqa: BLE001  (any failure of the cut or the forward is what is being checked)
        return True
