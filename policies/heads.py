"""Head pruning: remove whole attention heads from a HeadAttention (spaces/attention.py), physically.

A head is its rows of q_proj, k_proj and v_proj and its columns of out_proj; removing it removes all four, so the
attention keeps `num_heads * head_dim` consistent and its matmuls shrink with it. Heads are ranked on the untouched
model by the magnitude of those weights together (as Torch-Pruning ranks a coupled group), least important first;
the cut itself is Torch-Pruning's Linear pruning functions.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from squeezer.policies.context import ApplyContext
from squeezer.policies.policy import Policy
from squeezer.spaces.attention import HeadAttention, kept_heads
from squeezer.spaces.knobs import HEADS

__all__ = ["apply_heads", "head_order"]


def head_order(attention: HeadAttention, p: int = 2) -> list[int]:
    """The attention's heads, least important first: the p-norm of each head's q/k/v rows and out_proj columns
    (ties broken by index, so a policy applied twice removes the same heads)."""
    d = attention.head_dim
    with torch.no_grad():
        rows = [proj.weight.reshape(-1, d, proj.weight.shape[1]) for proj in
                (attention.q_proj, attention.k_proj, attention.v_proj)]
        score = sum(r.abs().pow(p).sum(dim=(1, 2)) for r in rows)
        score = score + attention.out_proj.weight.reshape(attention.out_proj.weight.shape[0], -1, d).abs().pow(p).sum(
            dim=(0, 2))
    return sorted(range(attention.num_heads), key=lambda h: (float(score[h]), h))


def _remove_heads(attention: HeadAttention, heads: list[int]) -> None:
    d = attention.head_dim
    idxs = [h * d + i for h in sorted(heads) for i in range(d)]
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        tp.prune_linear_out_channels(proj, idxs)
    tp.prune_linear_in_channels(attention.out_proj, idxs)
    attention.num_heads -= len(heads)


def apply_heads(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
    """Remove the least important heads of each attention the policy names (in place; returns the model)."""
    orders: dict[str, list[int]] = ctx.memo.setdefault(f"head orders {ctx.importance}", {})
    for name, choice in policy.layers.items():
        ratio = getattr(choice, HEADS)
        if not ratio or name not in ctx.space.units:
            continue
        info = ctx.space.units[name].layer
        gone = info.groups - kept_heads(info, ratio)
        if gone <= 0:
            continue
        if name not in orders:
            orders[name] = head_order(ctx.reference.get_submodule(name), p=1 if ctx.importance == "l1" else 2)
        module = model.get_submodule(name)
        if not isinstance(module, HeadAttention) or module.num_heads != info.groups:
            raise ValueError(f"unit {name!r} is not the {info.groups}-head attention the space traced")
        _remove_heads(module, orders[name][:gone])
    return model
