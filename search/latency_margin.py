"""A latency model (what a searcher predicts latency by), and how far below a latency limit a searcher aims,
learned from the search's own timed candidates.

Why: the latency table's sums miss what a policy's units cost together, and the candidates a budget makes (heavily
pruned, a few int8 units) are where it errs, mostly on the slow side. Aiming at the limit divided by the upper
quartile of measured / predicted over the latest timed candidates made more repaired candidates feasible than
aiming at the limit itself (benchmarks/RESULTS.md). Where the table predicts slow, the margin falls below 1 and the
searcher compresses less.
"""
from __future__ import annotations

import statistics
from typing import Protocol, Sequence

import optuna
from optuna.trial import TrialState

from squeezer.evaluators.measurement import Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.records import TrialRecord

__all__ = ["LatencyModel", "LatencyMargin", "timed", "prediction_error", "WINDOW", "MIN_POINTS"]

WINDOW = 16  # the latest timed candidates whose measured / predicted latency sets the margin
MIN_POINTS = 3  # timed candidates before the margin moves from 1


class LatencyModel(Protocol):
    """Predicts a policy's latency relative to the base model's, and learns from the ones the search timed
    (`evaluators.latency.LatencyTable` is one)."""

    def predict_rel(self, policy: Policy) -> float: ...

    def record(self, policy: Policy, measured_rel: float) -> None: ...


class LatencyMargin:
    """What a searcher multiplies the latency model's prediction by when it judges a latency limit."""

    def __init__(self, study: optuna.Study | None = None) -> None:
        self.ratios: list[float] = []  # measured / predicted, oldest first
        if study is not None:  # a resumed search starts from the margin it had
            for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                self.note(TrialRecord.from_trial(ft))

    def note(self, record: TrialRecord) -> None:
        """Learn from a finished trial's record: its `latency_predicted` (set when asked) and timed `latency_rel`."""
        predicted, measured = record.latency_predicted, record.latency_rel
        if predicted and measured and record.latency_source == "measured":
            self.ratios = [*self.ratios, measured / predicted][-WINDOW:]

    def notes(self, model: LatencyModel, policy: Policy) -> dict[str, float]:
        """What a proposal records for `note` to read back: the policy's predicted latency and the margin aimed by."""
        return {"latency_predicted": model.predict_rel(policy), "latency_margin": self.value()}

    def value(self) -> float:
        """The upper quartile of measured / predicted over the latest timed candidates, within [0.5, 2]."""
        if len(self.ratios) < MIN_POINTS:
            return 1.0
        return float(min(2.0, max(0.5, statistics.quantiles(self.ratios, n=4, method="inclusive")[2])))


def timed(outcome: Outcome) -> bool:
    """Whether `outcome`'s latency was timed (not predicted): what a latency model and a margin learn from."""
    return isinstance(outcome, Measurement) and outcome.latency_source == "measured" and bool(outcome.latency_rel)


def prediction_error(rows: Sequence[TrialRecord]) -> dict[str, float] | None:
    """How far the latency table's predictions were from the timings of the candidates a search timed: those of
    `--latency hybrid`, and of a search that judges a latency limit by the table. Each prediction was made before
    its candidate was timed, so this is the error the search's predicted numbers carry. None when no candidate has
    both."""
    pairs = [(r.latency_predicted, r.latency_rel) for r in rows
             if r.state == TrialState.COMPLETE and r.latency_source == "measured" and r.latency_predicted
             and r.latency_rel]
    if not pairs:
        return None
    errors = [abs(p - m) / m for p, m in pairs]
    return {"timed": len(pairs), "median_error": statistics.median(errors),
            "median_ratio": statistics.median(m / p for p, m in pairs)}
