"""Moving policies toward cheaper: the cheapest policy, and repair, walking each knob's choices from mild to aggressive
(`SearchSpace.choices`, ordered by the knob registry's `level`).

Everything here predicts cost from shapes (`SearchSpace.predict`) or, for latency, from a lookup table of timings,
never from a model, so it is cheap enough to run before every evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Sequence

from squeezer.policies.policy import Policy
from squeezer.search.metrics import cost_field
from squeezer.spaces.knobs import FORM, KNOBS, param_key, settle_params, split_key
from squeezer.spaces.space import SearchSpace

__all__ = ["full_params", "cheapest_policy", "repair"]


def _lowering(metrics: Collection[str]) -> set[str]:
    """The knobs whose compression can lower one of `metrics` (a knob's `lowers` in the registry)."""
    return {name for name, knob in KNOBS.items() if any(m in knob.lowers for m in metrics)}


def full_params(params: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Every 'unit/knob' of the space with a value (neutral where `params` has none): what Optuna records."""
    return {key: params.get(key, KNOBS[split_key(key)[1]].neutral) for key in space.distributions()}


def cheapest_policy(space: SearchSpace, metric: str = "macs") -> Policy:
    """The policy with the lowest predicted `metric`: every knob that lowers it (other than a layer's form) at its
    most compressed choice, then per unit the cheapest form.

    Given the pruning, each unit's cost no longer depends on the others, so choosing rank/block (and bits for
    size/BOPs) one unit at a time is exact.
    """
    field = cost_field(metric)
    knobs = _lowering([metric])
    forms_of = [k for k in KNOBS if k in knobs and KNOBS[k].role == FORM]
    params: dict[str, Any] = {}
    for key, choices in space.distributions().items():
        knob = KNOBS[split_key(key)[1]]
        if knob.name in knobs and knob.role != FORM:
            params[key] = choices[-1]
    for unit in space.units:
        forms: list[dict[str, Any]] = [{}]
        forms += [{param_key(unit, k): v} for k in forms_of for v in space.choices(unit, k)[1:]]
        if len(forms) > 1:
            best = min(forms, key=lambda f: getattr(space.predict(Policy.from_params({**params, **f}, space).layers),
                                                    field))
            params.update(best)
    return Policy.from_params(params, space, kind="cheapest", metric=metric)


def repair(policy: Policy, space: SearchSpace, violation: Callable[[Policy], Sequence[float]], *,
           metrics: Sequence[str] = ("macs",), undo: Collection[str] = (), max_steps: int = 2000) -> Policy:
    """Shrink `policy` until `violation(policy)` is all <= 0, one notch at a time, largest saving first.

    Each step tries moving every relevant knob one notch toward compression, and every `undo` knob back to leaving
    its unit alone, and keeps the move that lowers the summed violation most, so the most expensive units change
    first and cheap ones are left as sampled. `undo` is for knobs whose compression can cost what the budget limits:
    where int8 units run slower than float ones, a latency limit is met by dropping bit widths. Returns the policy
    unchanged when it already fits, and the closest policy reached if it cannot fit.
    """
    knobs = _lowering(metrics)
    params = full_params(policy.to_params(), space)

    def excess(p: Mapping[str, Any]) -> float:
        return sum(max(0.0, v) for v in violation(Policy.from_params(p, space)))

    current = start = excess(params)
    steps = 0
    if undo and current > 0:  # undo first, largest gain first: one pass, instead of a full scan for every undo
        left_alone = {key: space.choices(*split_key(key))[0] for key in params if split_key(key)[1] in undo}
        undos = {key: value for key, value in left_alone.items() if params[key] != value}
        for score, key in sorted((excess({**params, key: value}), key) for key, value in undos.items()):
            if current <= 0 or score >= start:  # this undo, and every one after it, gained nothing alone
                break
            trial = {**params, key: undos[key]}
            score = excess(trial)  # again: the policy has changed since this undo was scored alone
            if score < current:
                params, current = trial, score
                steps += 1
    while current > 0 and steps < max_steps:
        best_key, best_val, best = None, None, current
        for key, value in params.items():
            unit, knob = split_key(key)
            if knob not in knobs and knob not in undo:
                continue
            order = space.choices(unit, knob)
            i = order.index(value) if value in order else 0
            moves = [order[i + 1]] if knob in knobs and i + 1 < len(order) else []
            moves += [order[0]] if knob in undo and i > 0 else []
            for move in moves:
                trial = settle_params({**params, key: move}, keys=(key,))  # e.g. the swapped-in block has no rank
                score = excess(trial)
                if score < best:
                    best_key, best_val, best = key, trial, score
        if best_key is None:
            break
        params, current = best_val, best
        steps += 1
    meta = {**policy.meta, "repaired": steps > 0}
    return Policy.from_params(params, space, **meta)
