"""The one interface every search strategy offers, and how any of them records a trial in Optuna storage.

A searcher proposes a policy (`ask`) and learns from its outcome (`tell`). Recording is shared so every trial,
whatever proposed it, carries the same record (records.py): the evaluated policy, every measured metric, the
constraint values and feasibility — the only things fronts, reports and resume read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import optuna
from optuna.trial import TrialState

from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.objectives import Objective
from squeezer.search.records import TrialRecord

__all__ = ["Proposal", "Searcher", "EvalPool", "StudySearcher", "record_outcome", "asked_record", "write_record",
           "write_constraints", "CONSTRAINTS_ATTR"]

CONSTRAINTS_ATTR = "constraints"  # Optuna's system attr for a trial's constraint values (<= 0: within each limit)


@dataclass
class Proposal:
    """A policy to evaluate, tied to the Optuna trial that will hold its result; `record` is the trial as asked
    (its policy, the searcher's notes, what it carried from the queue), to which the outcome is added."""

    record: TrialRecord
    trial: optuna.Trial = field(repr=False)

    @property
    def trial_number(self) -> int:
        return self.record.number

    @property
    def policy(self) -> Policy:
        assert self.record.policy is not None
        return self.record.policy


def asked_record(trial: optuna.Trial, *, policy: Policy, searcher: str, repaired: bool | None = None,
                 latency_predicted: float | None = None, latency_margin: float | None = None) -> TrialRecord:
    """The record of a trial just asked: what it carried from the queue, the policy and the searcher's notes."""
    queued = TrialRecord.from_attrs(number=trial.number, state=TrialState.RUNNING, user_attrs=trial.user_attrs)
    return replace(queued, policy=policy, searcher=searcher, repaired=repaired, latency_predicted=latency_predicted,
                   latency_margin=latency_margin)


def write_record(trial: optuna.Trial, record: TrialRecord) -> None:
    """Store `record` in `trial`'s user attrs (an attr whose value is unchanged is set again, and costs nothing
    in the in-memory study the searcher works on)."""
    for key, value in record.attrs().items():
        trial.set_user_attr(key, value)


class Searcher(Protocol):
    def ask(self) -> Proposal: ...

    def tell(self, proposal: Proposal, outcome: Outcome) -> TrialRecord: ...


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

    def tell(self, proposal: Proposal, outcome: Outcome) -> TrialRecord:
        """Store the outcome in the proposal's trial, then learn from it; returns the record stored."""
        record = record_outcome(self.study, proposal, outcome, self.objective)
        self.learn(proposal, record)
        return record

    def learn(self, proposal: Proposal, record: TrialRecord) -> None:
        """Hook for searchers that keep their own model (the RL agent); Optuna samplers learn from storage."""


def record_outcome(study: optuna.Study, proposal: Proposal, outcome: Outcome, objective: Objective) -> TrialRecord:
    """Store `outcome` in the proposal's trial and finish it (COMPLETE, or FAIL with the reason); returns the record
    stored."""
    trial = proposal.trial
    if isinstance(outcome, EvalFailure):
        record = proposal.record.failed(outcome.reason, seconds=outcome.seconds)
    elif not isinstance(outcome, Measurement):
        record = proposal.record.failed(f"evaluator returned {type(outcome).__name__}, not a Measurement")
    else:
        constraints = objective.constraints(outcome)
        record = proposal.record.measured(outcome, constraints=constraints, cost_frac=objective.cost(outcome))
    write_record(trial, record)
    if record.state == TrialState.FAIL:
        study.tell(trial, state=TrialState.FAIL)
        return record
    assert isinstance(outcome, Measurement) and record.constraints is not None
    write_constraints(trial, record.constraints)
    study.tell(trial, objective.values(outcome))
    return record


def write_constraints(trial: optuna.Trial, values: Sequence[float]) -> None:
    """Store the budget's constraint values as the list in the trial's "constraints" system attr.

    That list is what a sampler's `constraints_func` writes, what every Optuna version's samplers and
    `FrozenTrial.constraints` read, and the only form optuna-dashboard shows. Optuna 5's named form
    (`Trial.set_constraint`) is left unwritten: a trial holding both would count each limit twice."""
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, [float(v) for v in values])
