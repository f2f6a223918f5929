"""What a trial's numbers mean to a sampler: Optuna objective values and constraint values from a Measurement.

Multi-objective ("multi"): maximise accuracy, minimise one cost metric as a fraction of the base model (the first
budget metric, else MACs), with the budget as Optuna constraints. Single-objective ("single"): maximise accuracy;
an infeasible trial's value is pushed below every feasible one (accuracy - 1 - violation), so samplers that know
nothing of constraints (CMA-ES, QMC, random) still rank it last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from optuna.trial import FrozenTrial

from squeezer.evaluators.measurement import Measurement
from squeezer.search.budget import METRICS, Budget, BudgetError, cost_fraction
from squeezer.search.records import TrialRecord

__all__ = ["Objective", "make_objective", "constraints_func", "KINDS"]

KINDS = ("multi", "single")


@dataclass(frozen=True)
class Objective:
    """How a Measurement turns into Optuna values and constraints for one study."""

    kind: str
    budget: Budget
    base: Measurement
    cost_metric: str = "macs"
    penalty: float = 1.0

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.kind == "multi" else ["maximize"]

    def constraints(self, m: Measurement) -> list[float]:
        return self.budget.constraint_values(m, self.base)

    def cost(self, m: Measurement) -> float:
        """The cost objective: the cost metric as a fraction of the base model's."""
        return cost_fraction(m, self.base, self.cost_metric)

    def values(self, m: Measurement) -> list[float]:
        if self.kind == "multi":
            return [float(m.accuracy), self.cost(m)]
        violation = sum(max(0.0, c) for c in self.constraints(m))
        return [float(m.accuracy) - (self.penalty + violation if violation > 0 else 0.0)]


def make_objective(kind: str = "multi", *, budget: Budget, base: Measurement,
                   cost_metric: str | None = None) -> Objective:
    """The objective of a study; `cost_metric` defaults to the budget's first metric, else MACs."""
    if kind not in KINDS:
        raise ValueError(f"unknown objective {kind!r}: choose 'multi' or 'single'")
    metric = cost_metric or (budget.metrics[0] if budget.metrics else "macs")
    if metric not in METRICS:
        raise BudgetError(f"unknown cost metric {metric!r}: choose from {', '.join(METRICS)}")
    return Objective(kind, budget, base, metric)


def constraints_func(trial: FrozenTrial) -> Sequence[float]:
    """Optuna's constraints_func: the values the searcher stored in the trial before telling it."""
    return TrialRecord.from_trial(trial).constraints or ()
