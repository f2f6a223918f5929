"""The trial record: what the one writer stores is what the one reader reads back, through a real SQLite study, and
studies written in the earlier layouts still read."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from squeezer.evaluators.measurement import EvalFailure, Measurement
from squeezer.policies.policy import LayerChoice, Policy
from squeezer.search.pareto import StudyResult
from squeezer.search.records import Driver, TrialRecord, promoted_key
from squeezer.search.study import requeue_stale, resolve_storage

POLICY = Policy(layers={"layer1.0.conv1": LayerChoice(prune=0.5, w_bits=4), "fc": LayerChoice(rank=0.25)},
                fingerprint="f00d", meta={"sampler": "tpe", "trial": 0, "repaired": True})
DISTS = {"layer1.0.conv1/prune": CategoricalDistribution([0.0, 0.5]), "fc/rank": CategoricalDistribution([1.0, 0.25])}
MEASURED = Measurement(accuracy=0.91, loss=0.3, macs=1200, params=340, bops=1200 * 4 * 32.0, size_mb=0.02,
                       latency_ms=0.21, latency_p90_ms=0.25, latency_spread=0.03, latency_rel=0.8,
                       latency_source="measured", latency_predicted=0.75, seconds=0.46, recovery="kd",
                       fingerprint="f00d", hardware={"cpu": "x86", "threads": 2})
READ_SIDE = ("cheap", "x")  # computed by readers, never stored


def _full_record() -> TrialRecord:
    """A record with every stored field away from its default."""
    params = {"layer1.0.conv1/prune": 0.5, "fc/rank": 0.25}
    asked = TrialRecord(number=0, state=TrialState.RUNNING, trial_params=params, policy=POLICY, searcher="ddpg",
                        repaired=True, latency_margin=1.2,
                        latency_predicted=0.7, driver=Driver(run="abc123", pid=4242, host="box"),
                        ddpg_actions=((0.25, 0.5), (1.0, 0.0)), ddpg_target=0.4, requeued_from=7)
    told = asked.measured(MEASURED, constraints=[-0.2, 0.1], cost_frac=0.45)
    return dataclasses.replace(told, values=(0.91, 0.45), fail_reason="an earlier attempt failed", stale=True)


def _study(folder: Path) -> optuna.Study:
    return optuna.create_study(study_name="squeezer", storage=resolve_storage("sqlite", folder),
                               directions=["maximize", "minimize"], load_if_exists=True)


def _add(study: optuna.Study, record: TrialRecord, user_attrs: dict | None = None) -> None:
    """Store a record as a trial through Optuna's public API."""
    study.add_trial(optuna.trial.create_trial(
        state=record.state, values=list(record.values) if record.values is not None else None,
        params=dict(record.trial_params),
        distributions={k: DISTS[k] for k in record.trial_params},
        user_attrs=record.attrs() if user_attrs is None else user_attrs))


def _reread(folder: Path) -> list[TrialRecord]:
    """The records of the run folder's study, read by a fresh storage as `squeezer front` would."""
    return StudyResult.load(folder).rows


def test_every_field_of_a_record_round_trips_through_a_sqlite_study(tmp_path: Path) -> None:
    record = _full_record()
    defaults = TrialRecord(number=0, state=TrialState.RUNNING)
    unset = [f.name for f in dataclasses.fields(TrialRecord)
             if f.name not in ("number", *READ_SIDE) and getattr(record, f.name) == getattr(defaults, f.name)]
    assert not unset, f"the test record leaves {unset} at their defaults: set them so they are round-tripped"
    _add(_study(tmp_path), record)
    [back] = _reread(tmp_path)
    assert back == record
    assert back.measurement() == MEASURED  # the evaluator's numbers, as it returned them


@pytest.mark.parametrize("state", [TrialState.RUNNING, TrialState.FAIL])
def test_unfinished_and_failed_records_round_trip(tmp_path: Path, state: TrialState) -> None:
    asked = TrialRecord(number=0, state=TrialState.RUNNING, policy=POLICY, searcher="tpe",
                        driver=Driver(run="r", pid=1, host="h"))
    record = asked.failed("EvalFailure: NaN accuracy", seconds=1.5) if state == TrialState.FAIL else asked
    _add(_study(tmp_path), record)
    [back] = _reread(tmp_path)
    assert back == record and back.measurement() is None and not back.completed
    assert set(record.attrs()) == ({"run", "metrics"} if state == TrialState.FAIL else {"run"})


def test_a_measured_record_keeps_the_searchers_prediction_unless_the_evaluator_made_one() -> None:
    asked = TrialRecord(number=3, state=TrialState.RUNNING, policy=POLICY, latency_predicted=0.6)
    untimed = dataclasses.replace(MEASURED, latency_predicted=None)
    assert asked.measured(untimed, constraints=[0.0], cost_frac=0.5).latency_predicted == 0.6
    told = asked.measured(MEASURED, constraints=[0.0, 0.01], cost_frac=0.5)
    assert told.latency_predicted == 0.75 and told.feasible is False and told.state == TrialState.COMPLETE
    assert EvalFailure("x").reason == asked.failed("x").fail_reason


def _todays_attrs(number: int, measured: Measurement | None) -> dict:
    """A trial's user attrs as the writer before TrialRecord stored them: the proposal's attrs (policy included) and
    the outcome in 'metrics' when told, the policy file and driver in 'run' when asked."""
    proposal = {"searcher": "tpe", "repaired": True, "latency_predicted": 0.7, "latency_margin": 1.1,
                "policy": POLICY.to_json()}
    attrs = {"run": {"policy_file": f"policies/trial_{number:05d}.json",
                     "driver": {"run": "old", "pid": 99999999, "host": "gone"}}}
    if measured is not None:
        attrs["metrics"] = {**proposal, **measured.metrics(), "constraints": [-0.1], "feasible": True,
                            "cost_frac": 0.5, "fidelity": "cheap", "hardware": dict(measured.hardware)}
    return attrs


def test_a_study_in_todays_format_still_reads(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.set_user_attr("budget", "macs<=60%")
    first, second = MEASURED, dataclasses.replace(MEASURED, accuracy=0.95, macs=1100, latency_predicted=None)
    for number, m in enumerate((first, second)):
        record = TrialRecord(number=number, state=TrialState.COMPLETE, trial_params={"fc/rank": 0.25},
                             values=(m.accuracy, 0.5))
        _add(study, record, user_attrs=_todays_attrs(number, m))
    _add(study, TrialRecord(number=2, state=TrialState.RUNNING, trial_params={"fc/rank": 1.0}),
         user_attrs=_todays_attrs(2, None))
    promoted = dataclasses.replace(MEASURED, accuracy=0.97, recovery="kd", latency_ms=None, latency_predicted=None)
    study.set_user_attr(promoted_key(1), {**promoted.metrics(), "constraints": [-0.1], "feasible": True,
                                          "cost_frac": 0.5})
    done, still, running = _reread(tmp_path)
    assert done.policy == POLICY and done.searcher == "tpe" and done.repaired is True
    assert done.driver == Driver(run="old", pid=99999999, host="gone")
    assert done.policy_file == "policies/trial_00000.json"
    assert done.measurement() == first and done.constraints == (-0.1,) and done.cost_frac == 0.5
    assert (done.latency_predicted, done.latency_margin, done.fidelity) == (0.75, 1.1, "cheap")
    # a promoted trial shows the promotion's numbers (its untimed latency too) and keeps the cheap ones
    assert (still.accuracy, still.fidelity, still.latency_ms, still.latency_predicted) == (0.97, "finetune", None, 0.7)
    assert still.cheap is not None and still.cheap.accuracy == 0.95 and still.cheap.latency_ms == 0.21
    assert running.state == TrialState.RUNNING and running.policy is None and running.driver.host == "gone"
    assert requeue_stale(study) == [2]  # its driver is gone: re-queued from what the old layout stored
    assert [r.number for r in StudyResult.load(tmp_path).front()] == [1]


def test_a_study_written_one_attr_per_metric_still_reads(tmp_path: Path) -> None:
    flat = {**MEASURED.metrics(), "policy": POLICY.to_json(), "searcher": "random", "constraints": [-0.3],
            "feasible": True, "cost_frac": 0.4, "policy_file": "policies/trial_00000.json"}
    _add(_study(tmp_path), TrialRecord(number=0, state=TrialState.COMPLETE, trial_params={"fc/rank": 0.25},
                                       values=(0.91, 0.4)), user_attrs=flat)
    [back] = _reread(tmp_path)
    assert back.completed and back.policy == POLICY and back.searcher == "random" and back.feasible
    assert dataclasses.replace(back.measurement(), hardware={}) == dataclasses.replace(MEASURED, hardware={})
