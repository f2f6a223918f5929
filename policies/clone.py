"""clone_module: a deep copy of a model, made quickly.

Every evaluation starts from a fresh copy of the base model. `copy.deepcopy` walks every attribute of every module
through the pickle protocol, a visible share of a cheap evaluation. Most of those attributes are empty hook
dictionaries and immutable settings (ints, tuples, strings), which need no copy at all. This clone copies what can
change (parameters, buffers, submodules, containers) directly and hands anything else to `copy.deepcopy` with one
shared memo, so it has deepcopy's meaning (shared weights stay shared, nothing is aliased with the original) at a
fraction of its cost.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["clone_module"]

_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_ATOMS = frozenset(_IMMUTABLE)


def _immutable(value: Any) -> bool:
    if isinstance(value, _IMMUTABLE):
        return True
    return type(value) is tuple and all(_immutable(v) for v in value)


def _tensor(value: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    if id(value) in memo:
        return memo[id(value)]
    if type(value) is nn.Parameter:
        copied: torch.Tensor = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    elif type(value) is torch.Tensor and not value.requires_grad:
        copied = value.clone()
    else:  # tensor subclasses, lazy parameters, tensors in an autograd graph: deepcopy knows them
        copied = copy.deepcopy(value, memo)
    memo[id(value)] = copied
    return copied


def _value(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMS:
        return value
    if (kind is dict or kind is OrderedDict) and not value:
        return kind()  # the many empty hook dictionaries
    if _immutable(value):
        return value
    if isinstance(value, nn.Module):
        return _module(value, memo)
    if isinstance(value, torch.Tensor):
        return _tensor(value, memo)
    if kind is set and not value:
        return set()
    return copy.deepcopy(value, memo)


def _module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if hasattr(cls, "__deepcopy__") or cls.__getstate__ is not nn.Module.__getstate__:
        return copy.deepcopy(module, memo)  # a module that defines its own copying or pickled state (RNNs) gets it
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = {}
    for name, value in module.__dict__.items():
        if name in ("_parameters", "_buffers", "_modules"):
            state[name] = type(value)((k, None if v is None else _value(v, memo)) for k, v in value.items())
        else:
            state[name] = _value(value, memo)
    new.__dict__.update(state)
    return new


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares no tensor, submodule or container with it (as `copy.deepcopy`)."""
    return _module(module, {})
