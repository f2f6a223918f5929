"""The one interface every search strategy offers, and how any of them records a trial in Optuna storage.

A searcher proposes a policy (`ask`) and learns from its outcome (`tell`). Recording is shared so every trial,
whatever proposed it, carries the same user attrs: the evaluated policy, every measured metric, the constraint
values and feasibility — the only things fronts, reports and resume read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.objectives import Objective

__all__ = ["Proposal", "Searcher", "EvalPool", "StudySearcher", "record_outcome"]


@dataclass
class Proposal:
    """A policy to evaluate, tied to the Optuna trial that will hold its result."""

    trial_number: int
    policy: Policy
    trial: optuna.Trial = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)


class Searcher(Protocol):
    def ask(self) -> Proposal: ...

    def tell(self, proposal: Proposal, outcome: Outcome) -> None: ...


class EvalPool(Protocol):
    """The evaluator pool's face, as the search loop uses it."""

    def submit(self, key: int, policy: Policy) -> None: ...

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]: ...

    def pending(self) -> int: ...

    def close(self) -> None: ...


class StudySearcher:
    """Base of the searchers: holds the study and objective, records outcomes, then lets the subclass learn."""

    def __init__(self, study: optuna.Study, objective: Objective) -> None:
        self.study = study
        self.objective = objective

    def ask(self) -> Proposal:  # pragma: no cover - abstract
        raise NotImplementedError

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        record_outcome(self.study, proposal, outcome, self.objective)
        self.learn(proposal, outcome)

    def learn(self, proposal: Proposal, outcome: Outcome) -> None:
        """Hook for searchers that keep their own model (the RL agent); Optuna samplers learn from storage."""


def record_outcome(study: optuna.Study, proposal: Proposal, outcome: Outcome, objective: Objective) -> None:
    """Store `outcome` in the proposal's trial and finish it (COMPLETE, or FAIL with the reason)."""
    trial = proposal.trial
    if isinstance(outcome, EvalFailure):
        trial.set_user_attr("fail_reason", outcome.reason)
        trial.set_user_attr("seconds", outcome.seconds)
        study.tell(trial, state=TrialState.FAIL)
        return
    if not isinstance(outcome, Measurement):
        trial.set_user_attr("fail_reason", f"evaluator returned {type(outcome).__name__}, not a Measurement")
        study.tell(trial, state=TrialState.FAIL)
        return
    constraints = objective.constraints(outcome)
    for key, value in outcome.metrics().items():
        trial.set_user_attr(key, value)
    if outcome.hardware:
        trial.set_user_attr("hardware", dict(outcome.hardware))
    trial.set_user_attr("constraints", constraints)
    if hasattr(trial, "set_constraint"):
        for limit, value in zip(objective.budget.limits, constraints):
            trial.set_constraint(limit.text, value)
    trial.set_user_attr("feasible", all(c <= 0 for c in constraints))
    trial.set_user_attr("cost_frac", objective.cost(outcome))
    trial.set_user_attr("fidelity", "cheap")
    study.tell(trial, objective.values(outcome))
