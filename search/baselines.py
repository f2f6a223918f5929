"""Uniform compression: the same choice for every unit, swept from none to most — the baseline a search must beat.

A level a in [0, 1] means, for every unit and knob, the choice at index round(a * (n - 1)) along the knob's
choices ordered by compression (the same mapping the RL agent uses), or with `knob` given, that knob alone at the
uniform value `Policy.uniform` picks.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from squeezer.evaluators.measurement import Measurement
from squeezer.policies.policy import Policy
from squeezer.search.budget import Budget, predicted_fraction
from squeezer.spaces.knobs import KNOBS, param_key
from squeezer.spaces.space import SearchSpace

__all__ = ["uniform_policy", "uniform_sweep", "uniform_at", "budget_starts"]


def uniform_policy(space: SearchSpace, level: float, *, knob: str | None = None) -> Policy:
    """Every unit at compression `level` (0 = untouched, 1 = most), for all knobs or only `knob`."""
    params: dict[str, Any] = {param_key(unit, k): space.at_level(unit, k, level) for unit, k in space.param_names()
                              if knob is None or k == knob}
    return Policy.from_params(params, space, kind="uniform", level=float(level), knob=knob or "all")


def uniform_sweep(space: SearchSpace, *, levels: int | Sequence[float] = 11, knob: str | None = None,
                  budget: Budget | None = None, base: Measurement | None = None,
                  latency: Callable[[Policy], float] | None = None) -> list[Policy]:
    """Distinct uniform policies over `levels`, keeping only those predicted within `budget` when given: a latency
    limit by `latency(policy)` (relative to the base, e.g. a lookup table's `predict_rel`) when given, else by the
    policy's MACs."""
    grid = np.linspace(0, 1, levels) if isinstance(levels, int) else levels
    out, seen = [], set()
    for level in grid:
        policy = uniform_policy(space, float(level), knob=knob)
        key = tuple(sorted(policy.to_params().items()))
        if key in seen:
            continue
        seen.add(key)
        if budget is not None and base is not None and budget.limits:
            cost = space.predict(policy.layers)
            rel = latency(policy) if latency is not None and "latency" in budget.metrics else None
            if any(v > 0 for v in budget.predicted_constraints(space, base, cost, latency_rel=rel)):
                continue
        out.append(policy)
    return out


def uniform_at(space: SearchSpace, fraction: float, *, metric: str = "macs", knob: str | None = "prune",
               levels: int = 41) -> Policy:
    """The least-compressed uniform policy predicted at or under `fraction` of the base `metric`."""
    baseline = space.baseline()
    for level in np.linspace(0, 1, levels):
        policy = uniform_policy(space, float(level), knob=knob)
        if predicted_fraction(metric, space.predict(policy.layers), baseline) <= fraction:
            return policy
    return uniform_policy(space, 1.0, knob=knob)


def budget_starts(space: SearchSpace, budget: Budget, base: Measurement, *, most: int,
                  latency: Callable[[Policy], float] | None = None) -> list[Policy]:
    """Where a budgeted search starts: for each knob, then for all at once, the least-compressed uniform policy
    predicted within `budget` (at most `most` of them, none where the budget has no limits). A latency limit is
    predicted by `latency` when the search has a lookup table, else by MACs, which cannot see that int8 units can
    run slower than float ones on small inputs.

    Uniform compression is the baseline a search must beat, and a short search does not find it by itself: drawn at
    random, every knob of every unit compresses nearly everything, far below what a uniform policy keeps.
    """
    if not budget.limits or most < 1:
        return []
    offered = {knob for _, knob in space.param_names()}
    out: list[Policy] = []
    seen: set[tuple] = set()
    for knob in [*(k for k in KNOBS if k in offered), None]:
        sweep = [p for p in uniform_sweep(space, levels=21, knob=knob, budget=budget, base=base, latency=latency)
                 if any(not c.is_neutral() for c in p.layers.values())]
        key = tuple(sorted(sweep[0].to_params().items())) if sweep else None
        if key is not None and key not in seen:
            seen.add(key)
            out.append(sweep[0])
    return out[:most]
