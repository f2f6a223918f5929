"""Budgeted search over a SearchSpace: Optuna samplers and an AMC-style agent, resumable from storage.

Names are loaded on first use so importing the package stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Budget": "budget", "BudgetError": "budget",
    "Objective": "objectives", "make_objective": "objectives",
    "Proposal": "searcher", "Searcher": "searcher", "EvalPool": "searcher",
    "OptunaSearcher": "optuna_searcher", "make_sampler": "optuna_searcher", "SAMPLERS": "optuna_searcher",
    "AmcAgent": "amc_agent", "AgentConfig": "amc_agent",
    "SearchConfig": "config", "RunConfig": "config",
    "run_search": "study", "make_searcher": "study", "SearchError": "study",
    "StudyResult": "pareto", "hypervolume": "pareto", "front_rows": "pareto",
    "uniform_policy": "baselines", "uniform_sweep": "baselines", "uniform_at": "baselines",
    "cheapest_policy": "shrink", "repair": "shrink",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'squeezer.search' has no attribute {name!r}")
    return getattr(importlib.import_module(f"squeezer.search.{_EXPORTS[name]}"), name)
