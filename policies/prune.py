"""Structured pruning: physically remove channels, coupled groups at a time, with Torch-Pruning."""
from __future__ import annotations

import torch_pruning as tp
from torch import nn

from squeezer.policies.context import ApplyContext
from squeezer.policies.policy import Policy

IMPORTANCE = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn": lambda: tp.importance.BNScaleImportance(),
}


def apply_prune(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
    """Remove the least important channels of each group the policy prunes (in place; returns the model)."""
    targets = {g: c.prune for g, c in policy.layers.items() if c.prune > 0 and g in ctx.space.groups}
    if not targets:
        return model
    if ctx.importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {ctx.importance!r}: choose from {', '.join(IMPORTANCE)}")
    importance = IMPORTANCE[ctx.importance]()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example_inputs[:1], verbose=False)
    for name, ratio in targets.items():
        group_info = ctx.space.groups[name]
        keep = ctx.space.kept(name, ratio)
        n_prune = group_info.channels - keep
        if n_prune <= 0:
            continue
        leader = model.get_submodule(name)
        fn = tp.prune_linear_out_channels if isinstance(leader, nn.Linear) else tp.prune_conv_out_channels
        full = graph.get_pruning_group(leader, fn, idxs=list(range(group_info.channels)))
        scores = importance(full)
        if scores is None:  # e.g. BN-scale importance on a group with no BatchNorm: fall back to magnitude
            scores = IMPORTANCE["l2"]()(full)
        # Stable order (ties broken by index) so applying a policy twice removes the same channels.
        order = sorted(range(group_info.channels), key=lambda i: (float(scores[i]), i))
        group = graph.get_pruning_group(leader, fn, idxs=sorted(order[:n_prune]))
        group.prune()
    return model


def kept_out_channels(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


