"""The one interface every search strategy offers, and how any of them records a trial in Optuna storage.

A searcher proposes a policy (`ask`) and learns from its outcome (`tell`). Recording is shared so every trial,
whatever proposed it, carries the same user attrs: the evaluated policy, every measured metric, the constraint
values and feasibility — the only things fronts, reports and resume read. The outcome is one user attr, `metrics`
(a dict), because an RDB storage commits each attr separately: one attr per metric cost ~0.1 s a trial in SQLite.
`trial_attrs` gives the flat view every reader uses (and reads studies written one attr per metric, too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.objectives import Objective

__all__ = ["Proposal", "Searcher", "EvalPool", "StudySearcher", "record_outcome", "trial_attrs", "METRICS_ATTR",
           "RUN_ATTR"]

METRICS_ATTR = "metrics"  # the outcome and the proposal's attrs, written once when the trial is told
RUN_ATTR = "run"  # written once when the trial is asked: its policy file and the driver evaluating it


def trial_attrs(trial: Any) -> dict[str, Any]:
    """A trial's user attrs with its records spread out: accuracy, macs, feasible, policy, driver, ... at the top."""
    attrs = dict(trial.user_attrs)
    return {**attrs.pop(METRICS_ATTR, {}), **attrs.pop(RUN_ATTR, {}), **attrs}


@dataclass
class Proposal:
    """A policy to evaluate, tied to the Optuna trial that will hold its result."""

    trial_number: int
    policy: Policy
    trial: optuna.Trial = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)  # stored with the outcome (policy, searcher, ...)


class Searcher(Protocol):
    def ask(self) -> Proposal: ...

    def tell(self, proposal: Proposal, outcome: Outcome) -> None: ...


class EvalPool(Protocol):
    """The evaluator pool's face, as the search loop uses it. A pool that evaluates inside `wait`, in the calling
    process, says so with `in_process = True` (the search then queues no policy beyond its workers)."""

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
        trial.set_user_attr(METRICS_ATTR, {**proposal.attrs, "fail_reason": outcome.reason,
                                           "seconds": outcome.seconds})
        study.tell(trial, state=TrialState.FAIL)
        return
    if not isinstance(outcome, Measurement):
        reason = f"evaluator returned {type(outcome).__name__}, not a Measurement"
        trial.set_user_attr(METRICS_ATTR, {**proposal.attrs, "fail_reason": reason})
        study.tell(trial, state=TrialState.FAIL)
        return
    constraints = objective.constraints(outcome)
    record = {**proposal.attrs, **outcome.metrics(), "constraints": constraints,
              "feasible": all(c <= 0 for c in constraints), "cost_frac": objective.cost(outcome), "fidelity": "cheap"}
    if outcome.hardware:
        record["hardware"] = dict(outcome.hardware)
    trial.set_user_attr(METRICS_ATTR, record)
    if hasattr(trial, "set_constraint"):
        for limit, value in zip(objective.budget.limits, constraints):
            trial.set_constraint(limit.text, value)
    study.tell(trial, objective.values(outcome))
