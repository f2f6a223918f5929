"""Structured pruning: physically remove channels, coupled groups at a time, with Torch-Pruning.

Channels are ranked on the untouched model, each group on its own: so which channels a group loses depends on that
group's ratio alone, not on what other groups lost first or in which order a policy lists them.

Everything about a group that does not depend on the policy is worked out once per model, on Torch-Pruning's
dependency graph of the untouched model, and kept in the context's memo: the ranking, and which indices of which
layer each of the group's channels is (its pruning group with every channel, whose items carry their root indices).
A policy's cut then runs Torch-Pruning's own pruning function on each affected layer of the copy, once, with the
indices of every group it prunes there: all in the untouched model's coordinates, so a layer that two groups reach
(a concatenation's consumer) loses both sets at once, as pruning the groups in turn would leave it. That skips
building a dependency graph of every copy (a traced forward pass) and two pruning groups per group, which cost
more than the rest of applying a policy. Where a group cannot
be replayed so (an item on a bare nn.Parameter, a customised pruner, or an index mapping without root indices) the
copy gets its own graph and the groups are pruned in turn, as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from squeezer.policies.clone import clone_module
from squeezer.policies.context import ApplyContext
from squeezer.policies.policy import Policy
from squeezer.spaces.dependency import (LayerCut, build_graph, layer_cuts, out_channel_fn, pruning_group,
                                        replay_cuts)

IMPORTANCE = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn": lambda: tp.importance.BNScaleImportance(),
}


@dataclass(frozen=True)
class GroupPlan:
    """What pruning a group needs that no policy changes: its channels, least important first, and its layers
    (None where the group cannot be replayed on a copy, see the module docstring)."""

    order: list[int]
    layers: list[LayerCut] | None


def group_plans(ctx: ApplyContext, names: Iterable[str]) -> dict[str, GroupPlan]:
    """Each group's plan, worked out on the untouched model (memoised in `ctx.memo`)."""
    if ctx.importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {ctx.importance!r}: choose from {', '.join(IMPORTANCE)}")
    plans: dict[str, GroupPlan] = ctx.memo.setdefault(f"prune plans {ctx.importance}", {})
    missing = [name for name in names if name not in plans]
    if missing:
        reference = clone_module(ctx.reference).eval()  # the graph's tracing must not touch the caller's model
        graph = build_graph(reference, ctx.example_inputs)
        module_names = {module: name for name, module in reference.named_modules()}
        importance = IMPORTANCE[ctx.importance]()
        for name in missing:
            leader = reference.get_submodule(name)
            channels = ctx.space.groups[name].channels
            full = pruning_group(graph, leader, range(channels))
            scores = importance(full)
            if scores is None:  # e.g. BN-scale importance on a group with no BatchNorm: fall back to magnitude
                scores = IMPORTANCE["l2"]()(full)
            # Stable order (ties broken by index) so applying a policy twice removes the same channels.
            order = sorted(range(channels), key=lambda i: (float(scores[i]), i))
            plans[name] = GroupPlan(order, layer_cuts(full, module_names))
    return plans


def apply_prune(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
    """Remove the least important channels of each group the policy prunes (in place; returns the model)."""
    targets = {g: c.prune for g, c in policy.layers.items() if c.prune > 0 and g in ctx.space.groups}
    cuts = {g: ctx.space.groups[g].channels - ctx.space.kept(g, ratio) for g, ratio in targets.items()}
    cuts = {g: n for g, n in cuts.items() if n > 0}
    if not cuts:
        return model
    plans = group_plans(ctx, cuts)
    if all(plans[name].layers is not None for name in cuts):
        replay_cuts(model, [(plans[name].layers, plans[name].order[:n]) for name, n in cuts.items()])
        return model
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example_inputs[:1], verbose=False)
    for name, n_prune in cuts.items():
        leader = model.get_submodule(name)
        graph.get_pruning_group(leader, out_channel_fn(leader), idxs=sorted(plans[name].order[:n_prune])).prune()
    return model


