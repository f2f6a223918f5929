"""Torch-Pruning's dependency analysis, bounded: a group whose analysis blows up is refused, never run out.

`DependencyGraph.get_pruning_group` redoes the whole graph's index mapping on every call (a shape inference over
every node, seconds on a transformer) and follows every path of index mappings without a limit: where reshapes and
permutes meet residual adds (a Swin stage) the index lists multiply until the process runs out of memory.
`pruning_group` walks the same dependencies with the same index mappings (the graph's mapping is computed once,
when it is built) and stops with `AnalysisTooLarge` once the indices it has produced exceed `MAX_INDICES`, which
bounds its time and memory; the group is then simply not prunable.

`replay_cuts` removes several groups' channels from a copy in one pass, every layer once, in the untouched model's
coordinates: the pruning applier (policies/prune.py) uses it, and so does the space, to check that each group's
smallest option leaves a model that still runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

__all__ = ["AnalysisTooLarge", "LayerCut", "MAX_INDICES", "build_graph", "layer_cuts", "out_channel_fn",
           "pruning_group", "replay_cuts"]

# Indices one group's analysis may produce (each a small Python object): far above what a group of a convolutional
# net or a transformer's MLP produces, far below what an exploding residual stream reaches.
MAX_INDICES = 2_000_000

# Torch-Pruning's stand-ins for tensor ops in its graph: pruning them only updates the graph's own bookkeeping.
_GRAPH_ONLY_OPS = tuple(getattr(tp.ops, name) for name in ("_ConcatOp", "_ElementWiseOp", "_ExpandOp", "_OutputOp",
                                                           "_ReshapeOp", "_SliceOp", "_SplitOp", "_UnbindOp")
                        if hasattr(tp.ops, name))


class AnalysisTooLarge(RuntimeError):
    """A group's dependency analysis produced more indices than `MAX_INDICES`."""


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model` traced on one sample (its index mapping computed once)."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs[:1], verbose=False)


def out_channel_fn(module: nn.Module) -> Callable:
    """Torch-Pruning's function that prunes `module`'s output channels."""
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def pruning_group(graph: tp.DependencyGraph, module: nn.Module, idxs: Iterable[int],
                  max_indices: int | None = None) -> Group:
    """What `graph.get_pruning_group(module, out_channel_fn(module), idxs)` returns (items merged per layer, each with
    its root indices), without recomputing the index mapping and within `max_indices` (MAX_INDICES) indices."""
    max_indices = MAX_INDICES if max_indices is None else max_indices
    if module not in graph.module2node:
        raise ValueError(f"{type(module).__name__} is not in the dependency graph")
    fn = out_channel_fn(module)
    if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels > 1:
        fn = tp.prune_depthwise_conv_out_channels
    root = graph.module2node[module]
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    items: list[tuple[Any, list]] = [(tp.Dependency(fn, fn, source=root, target=root), start)]
    done: set[tuple[Any, Any, tuple]] = set()
    visited: set[Any] = set()
    stack = [items[0]]
    produced = len(start)
    while stack:
        dep, indices = stack.pop()
        visited.add(dep.target)
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            new = indices
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    if produced + len(new) * _growth(mapping) > max_indices:  # checked before the list is built
                        raise AnalysisTooLarge(f"more than {max_indices} indices")
                    new = mapping(new)
            if not new:
                continue
            key = (new_dep.target, new_dep.handler, tuple(new))
            if new_dep.target in visited and key in done:
                continue
            done.add(key)
            produced += len(new)
            if produced > max_indices:
                raise AnalysisTooLarge(f"more than {max_indices} indices")
            items.append((new_dep, new))
            stack.append((new_dep, new))
    merged = Group()
    for dep, indices in items:
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in graph.ignored_params):
            continue
        merged.add_and_merge(dep, indices)
    merged._DG = graph
    for i in range(len(merged)):
        hybrid = merged[i].idxs
        merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
        merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return merged


def _growth(mapping: Any) -> int:
    """How many indices one index becomes through `mapping`: a flatten's stride (one channel, many features), else
    one (concatenations, splits and slices only shift or drop indices)."""
    if isinstance(mapping, _FlattenIndexMapping) and not mapping.reverse:
        return max(1, int(mapping._stride))
    return 1


@dataclass(frozen=True)
class LayerCut:
    """One layer's part in a group: which of its indices each of the group's channels is."""

    module: str  # the layer's name in the model
    handler: Callable[[nn.Module, list[int]], Any]  # Torch-Pruning's pruning function for it
    dim: int  # the pruning dimension Torch-Pruning sets on that function's pruner before calling it
    indices: dict[int, tuple[int, ...]]  # group channel -> this layer's indices


def layer_cuts(group: Group, names: Mapping[nn.Module, str]) -> list[LayerCut] | None:
    """The group's items as LayerCuts, or None where one of them cannot be replayed on another copy (an item on a
    bare nn.Parameter, a customised pruner, or an index mapping without root indices)."""
    layers = []
    for item in group.items:
        dep, roots = item.dep, getattr(item, "root_idxs", None)
        target = dep.target.module
        if isinstance(target, _GRAPH_ONLY_OPS):
            continue
        if (isinstance(target, torch.Tensor) or target not in names or roots is None or None in roots
                or not hasattr(dep.handler, "__self__")):
            return None
        indices: dict[int, list[int]] = {}
        for index, root in zip(item.idxs, roots):
            indices.setdefault(int(root), []).append(int(index))
        layers.append(LayerCut(names[target], dep.handler, dep.target.pruning_dim,
                               {root: tuple(found) for root, found in indices.items()}))
    return layers


def replay_cuts(model: nn.Module, cuts: Iterable[tuple[list[LayerCut], Iterable[int]]]) -> None:
    """Cut every affected layer of `model` once, with the indices of every (group layers, channels to remove) pair
    that reaches it: a layer two groups reach (a concatenation's consumer) loses both sets at once."""
    removed: dict[tuple[str, Any], tuple[int, set[int]]] = {}
    for layers, gone in cuts:
        gone = list(gone)
        for layer in layers:
            _, indices = removed.setdefault((layer.module, layer.handler), (layer.dim, set()))
            for channel in gone:
                indices.update(layer.indices.get(channel, ()))
    for (module, handler), (dim, indices) in removed.items():
        if indices:
            handler.__self__.pruning_dim = dim  # as Torch-Pruning's Dependency does before calling its handler
            handler(model.get_submodule(module), sorted(indices))
