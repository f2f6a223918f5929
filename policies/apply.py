"""apply_policy: turn a policy into a new, physically changed model.

Each knob of the registry (spaces/knobs.py) has its applier here, in `APPLIERS`. They run in a fixed order, each on
the output of the one before: prune (channels leave every layer of a group), heads (whole attention heads leave
their projections), decompose (a layer becomes its factor layers), swap blocks (a conv becomes a
depthwise-separable block, distilled to mimic the original), then quantize (weights and activations of whatever
layers now exist).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from squeezer.policies.blocks import apply_blocks
from squeezer.policies.clone import clone_module
from squeezer.policies.context import ApplyContext
from squeezer.policies.heads import apply_heads
from squeezer.policies.lowrank import apply_lowrank
from squeezer.policies.policy import Policy
from squeezer.policies.prune import apply_prune
from squeezer.policies.quantize import apply_quantize
from squeezer.spaces.attention import explicit_attention
from squeezer.spaces.knobs import A_BITS, BLOCK, HEADS, PRUNE, RANK, W_BITS, SpaceConfig
from squeezer.spaces.space import SearchSpace

Applier = Callable[[nn.Module, Policy, ApplyContext], nn.Module]

# Knob name -> its applier, in the order they run. Register a new knob's applier here. An applier serving several
# knobs (quantize: both bit widths, one wrapper per layer) is listed under each and runs once, at its first place.
APPLIERS: dict[str, Applier] = {PRUNE: apply_prune, HEADS: apply_heads, RANK: apply_lowrank, BLOCK: apply_blocks,
                                 W_BITS: apply_quantize, A_BITS: apply_quantize}


def register_applier(name: str, applier: Applier, *, before: str | None = None) -> None:
    """Add the applier of knob `name` (optionally before another knob's) so `apply_policy` runs it."""
    items = list(APPLIERS.items())
    index = [k for k, _ in items].index(before) if before else len(items)
    items.insert(index, (name, applier))
    APPLIERS.clear()
    APPLIERS.update(items)


def apply_policy(model: nn.Module, policy: Policy, calibration: Iterable[torch.Tensor] | None = None, *,
                 example_inputs: torch.Tensor | None = None, space: SearchSpace | None = None,
                 importance: str = "l2", distill_steps: int = 0, seed: int = 0,
                 memo: dict[str, Any] | None = None) -> nn.Module:
    """A new model with `policy` applied; `model` itself is left untouched.

    `memo`: pass one dictionary to every call for one `model` and what the appliers derive from the model alone
    (the pruning's channel ranking) is computed once (see ApplyContext).

    `calibration` is an iterable of input batches (or (inputs, labels) pairs). The example input shape comes from
    `example_inputs`, else the first calibration batch, else the policy's recorded input shape.
    """
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in (calibration or [])]
    if example_inputs is None:
        if batches:
            example_inputs = batches[0][:1]
        elif "input_shape" in policy.meta:
            example_inputs = torch.randn(*policy.meta["input_shape"])
        else:
            raise ValueError("apply_policy needs example_inputs or calibration batches to trace the model")
    device = next(model.parameters()).device
    example_inputs = example_inputs[:1].to(device)
    # Read only: nothing below writes to it, so no second copy. A model with
    # nn.MultiheadAttention is first rewritten (a copy, kept in the memo) into the form its space was traced in.
    memo = {} if memo is None else memo
    if "attention rewrite" not in memo:
        memo["attention rewrite"] = explicit_attention(model)
    reference = memo["attention rewrite"]
    work = clone_module(reference).eval()
    if space is None:  # the rounding the policy was made with (from_model sets eval mode)
        config = SpaceConfig() if policy.channel_round is None else SpaceConfig(round_to=policy.channel_round)
        space = SearchSpace.from_model(clone_module(model), example_inputs, config)
    policy.validate(space)
    # Forward order, whatever order the policy was written in (JSON sorts names): appliers meet units as the
    # search applied them.
    rank = {name: i for i, name in enumerate(space.units)}
    policy = dataclasses.replace(policy, layers=dict(sorted(policy.layers.items(),
                                                            key=lambda item: rank.get(item[0], len(rank)))))
    ctx = ApplyContext(space=space, example_inputs=example_inputs, reference=reference,
                       calibration=[b.to(device) for b in batches], importance=importance,
                       distill_steps=distill_steps, seed=seed, memo=memo)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for applier in dict.fromkeys(APPLIERS.values()):
            work = applier(work, policy, ctx)
    return work.eval()
